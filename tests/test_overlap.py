"""Overlap in generation: an actor's next unit is there before its current one ends, a unit
commits while the next one generates, a dead actor's waiting unit is redone uncounted, and
prompt embeddings are computed once per shard, the images unchanged bit for bit."""

from __future__ import annotations

import itertools
import json
import os
import signal
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import PROMPTS, job
from ray import cloudpickle
from test_faults import KEY, rows
from test_worker import one_unit, run, setup

from sdbatch.generation import generate
from sdbatch.spec import parse_spec
from sdbatch.sweep import Config
from sdbatch.worker import Worker

# Ray's actor processes cannot import this test module: ship its classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

# One configuration, 6 prompts x 2 images in units of 2 prompts: 3 units, 2 batches each.
SMALL = {"scheduler": ["ddim"], "guidance_scale": [7.5]}
ONE_ACTOR = {"batch_size": 2, "shard_size": 2, "actors": 1}


def timeline(folder: Path) -> type:
    """A worker that appends what it does, and when, to a file in `folder`; its commit takes a
    second, as an upload to a slow store would, and a batch at least 0.3 s, as on a GPU: longer
    than the driver's round trip (the tiny model's batches alone can be shorter on an idle
    machine, and the next unit then arrives after the current one's turn)."""

    class Timed(Worker):
        def note(self, event: str, unit) -> None:
            line = json.dumps([time.time(), event, unit.unit_id])
            with (folder / f"{os.getpid()}.jsonl").open("a") as f:
                f.write(line + "\n")

        def run(self, unit):
            self.note("requested", unit)
            yield from super().run(unit)

        def _generate(self, unit, prompts, seeds):
            self.note("batch", unit)
            time.sleep(0.3)
            return super()._generate(unit, prompts, seeds)

        def _commit(self, unit, rows, timings):
            self.note("commit", unit)
            time.sleep(1)
            marker = super()._commit(unit, rows, timings)
            self.note("committed", unit)
            return marker

    return Timed


def test_the_next_unit_is_there_before_the_current_ends_and_commits_overlap_generation(
    tmp_path, ray_address, monkeypatch
):
    log = tmp_path / "log"
    log.mkdir()
    monkeypatch.setattr("sdbatch.generation.Worker", timeline(log))
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt": PROMPTS}), prompts)
    spec = parse_spec(job(prompts, sweep=SMALL, runtime=ONE_ACTOR))
    summary = generate(spec, output=str(tmp_path / "out"), address=ray_address)
    assert summary.new_images == 12

    (events,) = [[json.loads(line) for line in f.read_text().splitlines()] for f in log.iterdir()]
    units = list(dict.fromkeys(u for _, e, u in events if e == "requested"))
    assert len(units) == 3
    at = {(e, u): t for t, e, u in events if e != "batch"}
    first_batch = {u: min(t for t, e, x in events if e == "batch" and x == u) for u in units}
    for current, following in itertools.pairwise(units):
        # the driver had handed the actor its next unit before the current one was done ...
        assert at["requested", following] < at["committed", current]
        # ... and that unit generated while the current one committed
        assert first_batch[following] < at["committed", current]
    # one unit generates at a time: a unit's batches all come before the next unit's
    batches = [u for _, e, u in events if e == "batch"]
    assert batches == [u for u in units for _ in range(2)]


def killed_waiting(flag: Path) -> type:
    """A worker whose process kills itself (SIGKILL) in its first unit's second batch, while
    its next unit waits its turn; the first time only."""

    class Killed(Worker):
        in_flight = 0

        def run(self, unit):
            self.in_flight += 1
            yield from super().run(unit)
            self.in_flight -= 1

        def _generate(self, unit, prompts, seeds):
            if unit.prompts[prompts[0]] == PROMPTS[1]:
                try:
                    with flag.open("x") as f:
                        f.write(str(self.in_flight))  # the units the actor holds as it dies
                except FileExistsError:
                    pass
                else:
                    os.kill(os.getpid(), signal.SIGKILL)
            return super()._generate(unit, prompts, seeds)

    return Killed


def test_a_dead_actors_running_and_waiting_units_are_both_redone_only_one_counted(
    tmp_path, ray_address, monkeypatch, caplog
):
    flag = tmp_path / "killed"
    monkeypatch.setattr("sdbatch.generation.Worker", killed_waiting(flag))
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt": PROMPTS}), prompts)
    spec = parse_spec(job(prompts, sweep=SMALL, runtime=ONE_ACTOR))
    out = tmp_path / "out"
    summary = generate(spec, output=str(out), address=ray_address)

    assert flag.read_text() == "2", "the fault was never injected with a unit waiting"
    assert "a worker died during unit" in caplog.text
    # the unit that was generating counts an attempt; the one waiting behind it does not
    assert caplog.text.count("failed (attempt 1 of 3), will retry: worker died") == 1
    assert summary.new_images == 12 and not summary.failed
    got = [tuple(r[k] for k in KEY) for r in rows(out)]
    assert len(got) == len(set(got)) == 12
    assert json.loads((out / "run.json").read_text())["history"][-1]["failed_units"] == []


class Uncached(Worker):
    """The pipeline encodes the prompts itself, at every call: sdbatch before the cache."""

    def _prompt_inputs(self, unit, prompts):
        return {
            "prompt": [unit.prompts[p] for p in prompts],
            "negative_prompt": [unit.negative_prompts[p] for p in prompts],
        }


def encoder_calls(worker: Worker) -> list[int]:
    """A list that grows by one with each call of the worker's text encoder."""
    calls: list[int] = []
    worker.pipe.text_encoder.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_prompt_embeddings_are_computed_once_per_shard_and_the_images_stay_the_same(tmp_path):
    texts = ("a cat", "a dog", "a cow")
    negatives = ["blurry", None, "dark"]
    configs = [
        Config("ddim", 2, 7.5, 32, 32, ""),
        Config("euler", 2, 7.5, 32, 32, ""),
        Config("euler", 2, 7.5, 48, 32, ""),
        Config("euler", 2, 1.0, 32, 32, ""),  # no guidance: no negative prompts
    ]
    units = [one_unit(c, texts, images_per_prompt=2, negatives=negatives) for c in configs]
    cached = Worker(setup(tmp_path / "cached", batch_size=4))
    uncached = Uncached(setup(tmp_path / "uncached", batch_size=4))
    calls = encoder_calls(cached), encoder_calls(uncached)

    for unit in units:
        (_, mine), (_, theirs) = run(cached, unit), run(uncached, unit)
        assert mine.images == theirs.images == 6
        a = pq.read_table(tmp_path / "cached" / mine.file).to_pylist()
        b = pq.read_table(tmp_path / "uncached" / theirs.file).to_pylist()
        assert [r["image"]["bytes"] for r in a] == [r["image"]["bytes"] for r in b]

    # cached: the shard's prompts and negatives once for the guided configurations, its prompts
    # once more without guidance; uncached: both at each of a guided unit's 2 batches, the
    # prompts at each unguided batch
    assert len(calls[0]) == 2 + 1
    assert len(calls[1]) == 3 * 2 * 2 + 2
