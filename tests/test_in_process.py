"""Units run in the driver's process (`in_process.run_units_here`): retries, failures and stops as
on actors; and `sdbatch eval` with one CPU actor and no cluster extracts there, without Ray,
writing the same metrics as its actors do."""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import suite_data

from sdbatch import distribute
from sdbatch.errors import STOP_REQUESTED, JobFailed
from sdbatch.evaluation.run import evaluate, extracts_here
from sdbatch.evaluation.suite import parse_suite
from sdbatch.in_process import run_units_here


class Unit:
    def __init__(self, unit_id: str, images: int = 3):
        self.unit_id, self.images = unit_id, images


class Flaky:
    """A worker whose units fail on their first `failures[unit_id]` attempts, after a batch."""

    UNITS_IN_FLIGHT = 2  # ignored here: one unit at a time

    def __init__(self, setup: dict):
        self.failures = dict(setup)
        self.attempts: dict[str, int] = {}

    def describe(self):
        return {"pid": os.getpid()}

    def run(self, unit):
        self.attempts[unit.unit_id] = self.attempts.get(unit.unit_id, 0) + 1
        yield 0  # a turn beginning, as generation's worker yields
        yield 1
        if self.attempts[unit.unit_id] <= self.failures.get(unit.unit_id, 0):
            raise OSError(f"reading {unit.unit_id} failed\nsecond line")
        yield unit.images - 1
        yield {"unit_id": unit.unit_id, "attempt": self.attempts[unit.unit_id]}


def test_units_are_retried_and_given_up_on_as_on_actors(caplog):
    units = [Unit("a"), Unit("b"), Unit("c")]
    with caplog.at_level(logging.WARNING, logger="sdbatch"):
        result = run_units_here(Flaky, {"a": 1, "b": 5}, units, (9, 0, "testing"), retries=2)
    assert result.results == {
        "a": {"unit_id": "a", "attempt": 2},
        "c": {"unit_id": "c", "attempt": 1},
    }
    assert list(result.failed) == ["b"]
    failure = result.failed["b"]
    assert failure.unit is units[1] and failure.attempts == 3
    assert failure.error == "OSError: reading b failed"
    assert result.workers == [{"pid": os.getpid()}]
    retried = [r for r in caplog.records if "will retry" in r.getMessage()]
    assert len(retried) == 3  # a once, b twice
    assert any("b failed 3 times, giving up" in r.getMessage() for r in caplog.records)


def test_a_worker_that_cannot_load_fails_the_run():
    class Broken:
        def __init__(self, setup):
            raise FileNotFoundError("no model at /nowhere")

    with pytest.raises(JobFailed, match="failed to load: FileNotFoundError: no model at /nowhere"):
        run_units_here(Broken, {}, [Unit("a")], (3, 0, "testing"), retries=2)


def test_a_unit_raising_job_failed_stops_at_once():
    class Refusing(Flaky):
        def run(self, unit):
            self.attempts[unit.unit_id] = self.attempts.get(unit.unit_id, 0) + 1
            raise JobFailed("the store is full")
            yield

    worker = Refusing({})
    with pytest.raises(JobFailed, match="the store is full"):
        run_units_here(lambda setup: worker, {}, [Unit("a"), Unit("b")], (6, 0, "x"), retries=3)
    assert worker.attempts == {"a": 1}


def test_a_requested_stop_ends_the_run_between_batches():
    worker = Flaky({})
    STOP_REQUESTED.set()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_units_here(lambda setup: worker, {}, [Unit("a"), Unit("b")], (6, 0, "x"), 1)
    finally:
        STOP_REQUESTED.clear()
    assert worker.attempts == {"a": 1}


def test_eval_without_a_cluster_extracts_in_the_driver_as_its_actors_do(
    evaluated_output, tmp_path, monkeypatch, caplog
):
    """The fixture evaluated on 2 actors; one actor on this machine (no cluster, no GPU) is the
    driver itself: no Ray session, the same metrics (float32 features summed by other threads).
    FID's caveat (14 images < 16 dimensions) is said once for the table, not per configuration."""
    out = tmp_path / "out"
    shutil.copytree(evaluated_output["out"], out)
    shutil.rmtree(out / "metrics")
    data = suite_data(evaluated_output["reference"], tmp_path / "cache")
    suite = parse_suite({**data, "runtime": {"actors": 1, "batch_size": 8}})
    # This test process holds the tests' Ray session; without it there would be no cluster.
    monkeypatch.setattr(distribute, "has_cluster", lambda address: False)
    if not distribute.local_without_gpu(None):
        pytest.skip("a GPU machine extracts on actors")
    assert extracts_here(suite, None)
    assert not extracts_here(parse_suite(data), None)  # 2 actors asked for

    def no_ray(address):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(distribute, "session", no_ray)
    with caplog.at_level(logging.WARNING, logger="sdbatch"):
        evaluate(str(out), suite)
    caveats = [r.getMessage() for r in caplog.records if "feature dimensions" in r.getMessage()]
    assert len(caveats) == 1 and caveats[0].startswith("FID of 4 of 4 configurations (14 to 14")

    record = json.loads((out / "metrics" / "metrics.json").read_text())
    (worker,) = record["workers"]
    assert worker["pid"] == os.getpid() and worker["units"] > 1
    before = evaluated_output["out"] / "metrics"
    for name in ("configs", "replicates", "differences", "effects"):
        expected, got = (
            pd.read_parquet(before / f"{name}.parquet"),
            pd.read_parquet(out / "metrics" / f"{name}.parquet"),
        )
        assert list(got.columns) == list(expected.columns), name
        for column in expected.columns:
            if pd.api.types.is_float_dtype(expected[column]):
                np.testing.assert_allclose(got[column], expected[column], rtol=1e-4, atol=1e-6)
            else:
                assert got[column].tolist() == expected[column].tolist(), (name, column)
