"""Faults injected for real on a real Ray: a worker process killed mid-unit, a unit that keeps
raising. The faulty workers are the real Worker with one method wrapped; Ray ships the classes
to its actor processes by value (they are defined inside a function)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import PROMPTS, job

from sdbatch.cli import EXIT_INCOMPLETE, EXIT_OK
from sdbatch.cli import main as cli_main
from sdbatch.generate import generate
from sdbatch.spec import parse_spec
from sdbatch.worker import Worker

KEY = ["prompt_id", "sample_index", "config_id"]
# One configuration, 6 prompts x 2 images; units of 2 prompts in batches of 2 images, so a unit
# has two batches and a fault in its second prompt lands mid-unit.
SMALL = {"scheduler": ["ddim"], "guidance_scale": [7.5]}
RUNTIME = {"batch_size": 2, "shard_size": 2, "actors": 2}
TARGET = PROMPTS[1]  # the second prompt of the first unit


def killed_once(flag: Path) -> type:
    """A worker whose process kills itself (SIGKILL) at TARGET's batch, the first time only."""

    class KilledOnce(Worker):
        def _generate(self, unit, prompts, seeds):
            if any(unit.prompts[p] == TARGET for p in prompts):
                try:
                    flag.touch(exist_ok=False)
                except FileExistsError:
                    pass
                else:
                    os.kill(os.getpid(), signal.SIGKILL)
            return super()._generate(unit, prompts, seeds)

    return KilledOnce


def raises_while(flag: Path) -> type:
    """A worker whose pipeline raises on TARGET for as long as `flag` exists."""

    class Raises(Worker):
        def _generate(self, unit, prompts, seeds):
            if flag.exists() and any(unit.prompts[p] == TARGET for p in prompts):
                raise ValueError(f"cannot draw {TARGET!r}")
            return super()._generate(unit, prompts, seeds)

    return Raises


def rows(output: Path) -> list[dict]:
    table = pads.dataset(str(output / "images")).to_table()
    return sorted(table.to_pylist(), key=lambda r: tuple(r[k] for k in KEY))


def write_spec(folder: Path, prompts: Path, **runtime) -> Path:
    path = folder / "job.yaml"
    data = job(prompts, sweep=SMALL, runtime={**RUNTIME, **runtime})
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, ray_address):
    """The small job run with no fault: its rows, sorted by key."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    prompts = folder / "prompts.parquet"
    pq.write_table(pa.table({"prompt": PROMPTS}), prompts)
    spec = parse_spec(job(prompts, sweep=SMALL, runtime=RUNTIME))
    summary = generate(spec, str(folder / "out"), ray_address)
    assert summary.new_images == summary.total_images == 12
    return prompts, rows(folder / "out")


def test_a_worker_killed_mid_unit_is_replaced_and_the_unit_redone(
    uninterrupted, tmp_path, ray_address, monkeypatch, caplog
):
    prompts, expected = uninterrupted
    flag = tmp_path / "killed"
    monkeypatch.setattr("sdbatch.generate.Worker", killed_once(flag))
    spec = yaml.safe_load(write_spec(tmp_path, prompts).read_text())
    summary = generate(parse_spec(spec), str(tmp_path / "out"), ray_address)

    assert flag.exists(), "the fault was never injected"
    assert "a worker died during unit" in caplog.text
    assert summary.new_images == 12 and not summary.failed
    got = rows(tmp_path / "out")
    assert [tuple(r[k] for k in KEY) for r in got] == [tuple(r[k] for k in KEY) for r in expected]
    assert [r["image"]["bytes"] for r in got] == [r["image"]["bytes"] for r in expected]
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["history"][-1]["failed_units"] == []


def test_a_unit_that_keeps_failing_is_recorded_and_only_it_is_rerun(
    uninterrupted, tmp_path, ray_address, monkeypatch, capsys, caplog
):
    prompts, expected = uninterrupted
    flag = tmp_path / "broken"
    flag.touch()
    monkeypatch.setattr("sdbatch.generate.Worker", raises_while(flag))
    spec = str(write_spec(tmp_path, prompts, retries=1))
    out = tmp_path / "out"
    args = ["generate", spec, "--out", str(out), "--address", ray_address]

    # 1. the bad unit fails both attempts; the other units complete; the exit status says so
    assert cli_main(args) == EXIT_INCOMPLETE
    err = capsys.readouterr().err
    assert "incomplete: 1 work unit(s), 4 images, failed after 2 attempts" in err
    assert f"ValueError: cannot draw {TARGET!r}" in err
    failed = json.loads((out / "run.json").read_text())["history"][-1]["failed_units"]
    assert len(failed) == 1 and failed[0]["attempts"] == 2 and failed[0]["images"] == 4
    assert failed[0]["error"] == f"ValueError: cannot draw {TARGET!r}"
    bad = {r["prompt_id"] for r in expected if r["prompt"] in (PROMPTS[0], TARGET)}
    assert set(failed[0]["prompt_ids"]) == bad
    done = rows(out)
    assert len(done) == 8 and not {r["prompt_id"] for r in done} & bad
    assert not list((out / "_tmp").iterdir())

    # 2. once the cause is gone, a rerun generates just that unit
    flag.unlink()
    committed = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    assert cli_main(args) == EXIT_OK
    assert "resuming: 8 images done, 4 left in 1 units" in caplog.text
    for name, mtime in committed.items():
        assert (out / "images" / name).stat().st_mtime_ns == mtime
    got = rows(out)
    assert [r["image"]["bytes"] for r in got] == [r["image"]["bytes"] for r in expected]
