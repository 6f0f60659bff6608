"""Faults injected for real on a real Ray: worker processes killed mid-unit or while loading, a
unit that keeps raising, a model that cannot load, an eval driver killed mid-way. The faulty
workers are the real Worker with one method wrapped."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import PROMPTS, job, suite_data
from ray import cloudpickle

from sdbatch.cli import EXIT_INCOMPLETE, EXIT_OK
from sdbatch.cli import main as cli_main
from sdbatch.errors import JobFailed
from sdbatch.evaluation.run import evaluate
from sdbatch.evaluation.suite import parse_suite
from sdbatch.evaluation.table import TIMING_COLUMNS
from sdbatch.generation import generate
from sdbatch.spec import parse_spec
from sdbatch.toy.world import write_reference
from sdbatch.worker import Worker

KEY = ["prompt_id", "sample_index", "config_id"]
# One configuration, 6 prompts x 2 images; units of 2 prompts in batches of 2 images, so a unit
# has two batches and a fault in its second prompt lands mid-unit.
SMALL = {"scheduler": ["ddim"], "guidance_scale": [7.5]}
RUNTIME = {"batch_size": 2, "shard_size": 2, "actors": 2}
TARGET = PROMPTS[1]  # the second prompt of the first unit


# Ray's actor processes cannot import this test module: ship its functions and classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def die_the_first_time(flag: Path) -> None:
    """SIGKILL this process unless `flag` exists, creating it (atomically: one process dies)."""
    try:
        flag.touch(exist_ok=False)
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def killed_once(flag: Path) -> type:
    """A worker whose process kills itself (SIGKILL) at TARGET's batch, the first time only."""

    class KilledOnce(Worker):
        def _generate(self, unit, prompts, seeds):
            if any(unit.prompts[p] == TARGET for p in prompts):
                die_the_first_time(flag)
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
    summary = generate(spec, output=str(folder / "out"), address=ray_address)
    assert summary.new_images == summary.total_images == 12
    return prompts, rows(folder / "out")


def test_a_worker_killed_mid_unit_is_replaced_and_the_unit_redone(
    uninterrupted, tmp_path, ray_address, monkeypatch, caplog
):
    prompts, expected = uninterrupted
    flag = tmp_path / "killed"
    monkeypatch.setattr("sdbatch.generation.Worker", killed_once(flag))
    spec = yaml.safe_load(write_spec(tmp_path, prompts).read_text())
    summary = generate(parse_spec(spec), output=str(tmp_path / "out"), address=ray_address)

    assert flag.exists(), "the fault was never injected"
    assert "a worker died during unit" in caplog.text
    assert "worker died: " in caplog.text
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
    monkeypatch.setattr("sdbatch.generation.Worker", raises_while(flag))
    spec = str(write_spec(tmp_path, prompts, retries=1))
    out = tmp_path / "out"
    args = ["generate", spec, "--out", str(out), "--address", ray_address]

    # 1. the unit with the bad prompt fails both attempts, is split in two, and only the half
    # with the bad prompt fails; everything else completes; the exit status says so
    assert cli_main(args) == EXIT_INCOMPLETE
    err = capsys.readouterr().err
    assert "incomplete: 1 work unit(s), 2 images, failed after 3 attempts" in err
    assert f"ValueError: cannot draw {TARGET!r}" in err
    failed = json.loads((out / "run.json").read_text())["history"][-1]["failed_units"]
    bad = {r["prompt_id"] for r in expected if r["prompt"] == TARGET}
    assert len(failed) == 1 and set(failed[0]["prompt_ids"]) == bad
    assert failed[0]["attempts"] == 3 and failed[0]["images"] == 2
    assert failed[0]["error"] == f"ValueError: cannot draw {TARGET!r}"
    done = rows(out)
    assert len(done) == 10 and not {r["prompt_id"] for r in done} & bad
    assert {r["prompt"] for r in done} == set(PROMPTS) - {TARGET}
    assert not list((out / "_tmp").iterdir())

    # 2. once the cause is gone, a rerun generates just that unit
    flag.unlink()
    committed = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    assert cli_main(args) == EXIT_OK
    assert "resuming: 10 images done, 2 left in 1 units" in caplog.text
    for name, mtime in committed.items():
        assert (out / "images" / name).stat().st_mtime_ns == mtime
    got = rows(out)
    assert [r["image"]["bytes"] for r in got] == [r["image"]["bytes"] for r in expected]


# The eval command, run as its own driver process, with each unit slowed down so that a SIGKILL
# can land between shards; the kill itself is real.
SLOW_EVAL = """
import sys, time
import sdbatch.evaluation.run
from sdbatch.cli import main

class Slow(sdbatch.evaluation.run.FeatureWorker):
    def run(self, unit):
        time.sleep(0.3)
        yield from super().run(unit)

sdbatch.evaluation.run.FeatureWorker = Slow
sys.exit(main(sys.argv[1:]))
"""


def test_eval_killed_mid_way_resumes_without_redoing_finished_shards(
    evaluated_output, tmp_path, ray_address, caplog
):
    # 1. a copy of the generated output, never evaluated, and a reference of three files
    reference = tmp_path / "reference"
    reference.mkdir()
    for seed in range(3):
        write_reference(str(reference / f"part{seed}.parquet"), count=30, size=32, seed=seed)
    data = suite_data(reference, tmp_path / "cache", runtime={"actors": 1, "batch_size": 8})
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump(data))
    outputs = {}
    for name in ("killed", "whole"):
        outputs[name] = tmp_path / name
        shutil.copytree(
            evaluated_output["out"], outputs[name], ignore=shutil.ignore_patterns("metrics")
        )

    # 2. kill the driver once some reference shards are written
    args = ["eval", str(outputs["killed"]), "--suite", str(suite), "--address", ray_address]
    driver = subprocess.Popen(
        [sys.executable, "-c", SLOW_EVAL, *args], stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 240
    while len(list((tmp_path / "cache").rglob("*.npz"))) < 2:
        assert driver.poll() is None, driver.communicate()
        assert time.time() < deadline, "no shard was written in time"
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    time.sleep(3)  # the dead driver's actor may finish the unit it holds
    shards = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.npz")}
    assert not (outputs["killed"] / "metrics" / "metrics.json").exists()
    assert not list((tmp_path / "cache").glob("*.npz")), "the reference should be unfinished"

    # 3. the rerun extracts only what is missing and agrees with an uninterrupted evaluation
    caplog.set_level(logging.INFO, logger="sdbatch")
    resumed = evaluate(str(outputs["killed"]), parse_suite(data), address=ray_address)
    units = 3 + len(list((outputs["killed"] / "_units").glob("*.json")))
    assert f"; {units - len(shards)} units to extract" in caplog.text
    for path, mtime in shards.items():
        if path.exists():  # reference shards are dropped once the statistics are cached
            assert path.stat().st_mtime_ns == mtime, f"{path.name} was extracted again"
    whole = evaluate(str(outputs["whole"]), parse_suite(data), address=ray_address)
    columns = [c for c in whole.configs.columns if c not in TIMING_COLUMNS]
    pd.testing.assert_frame_equal(
        resumed.configs[columns].set_index("config_id").sort_index(),
        whole.configs[columns].set_index("config_id").sort_index(),
        rtol=1e-6,
    )


def test_a_worker_killed_while_loading_is_replaced_but_a_broken_model_stops_the_job(
    uninterrupted, tmp_path, ray_address, monkeypatch
):
    prompts, _ = uninterrupted
    flag = tmp_path / "killed"

    class KilledWhileLoading(Worker):
        def __init__(self, settings):
            die_the_first_time(flag)
            super().__init__(settings)

    class CannotLoad(Worker):
        def __init__(self, settings):
            raise OSError("no file named diffusion_pytorch_model.safetensors")

    spec = parse_spec(job(prompts, sweep=SMALL, runtime={**RUNTIME, "actors": 1}))
    monkeypatch.setattr("sdbatch.generation.Worker", KilledWhileLoading)
    summary = generate(spec, output=str(tmp_path / "out"), address=ray_address)
    assert flag.exists() and summary.new_images == 12 and not summary.failed

    monkeypatch.setattr("sdbatch.generation.Worker", CannotLoad)
    began = time.perf_counter()
    with pytest.raises(
        JobFailed, match=r"a worker failed to load: OSError: no file named diffusion_pytorch_model"
    ):
        generate(spec, output=str(tmp_path / "broken"), address=ray_address)
    assert time.perf_counter() - began < 60  # not retried over and over
    assert not list((tmp_path / "broken" / "_units").glob("*.json"))
