"""The per-configuration table computed by Ray actors equals the driver's: the same bootstrap
draws of prompts for every configuration, whichever process computes it, so paired comparisons
are unchanged; and the reference's parts are computed once, not by each actor."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from conftest import suite_data

from sdbatch.evaluation import table
from sdbatch.evaluation.metric_math import FeatureStats
from sdbatch.evaluation.reference import ReferenceStats
from sdbatch.evaluation.run import evaluate
from sdbatch.evaluation.suite import parse_suite
from sdbatch.evaluation.table import (
    ConfigUnit,
    TableContext,
    TableSetup,
    TableWorker,
    config_metrics,
    table_metrics,
)
from sdbatch.output import METRICS_DIR

METRICS = ["clip_score", "fid", "kid", "cmmd", "precision", "recall", "density", "coverage"]
RTOL = 1e-12


def synthetic(tmp_path, configs: int = 5, prompts: int = 12, dim: int = 6):
    """Configurations of 2 images per prompt (one lacks a prompt, one has an image excluded),
    random features, embeddings and CLIP scores, against a random reference of 40."""
    rng = np.random.default_rng(1)
    real = rng.normal(0.3, 1.0, size=(40, dim))
    stats = FeatureStats.of(real)
    reference = ReferenceStats(
        stats.mean(), stats.covariance(), len(real), real.astype(np.float32), clip_embeddings=real
    )
    (tmp_path / "reference.parquet").touch()
    data = suite_data(tmp_path / "reference.parquet", tmp_path / "cache", metrics=METRICS)
    suite = parse_suite({**data, "bootstrap": {"samples": 30, "seed": 7}})
    units, ids = [], []
    for c in range(configs):
        kept = [p for p in range(prompts) if not (c == 1 and p == 0)]
        prompt_ids = [f"p{p:02d}" for p in kept for _ in range(2)][: None if c != 2 else -1]
        n = len(prompt_ids)
        ids += prompt_ids
        features = rng.normal(0.1 * c, 1.0, size=(n, dim)).astype(np.float32)
        images = pd.DataFrame({"prompt_id": prompt_ids, "clip_score": rng.random(n) * 30})
        merged = FeatureStats.of(features)
        units.append(ConfigUnit(f"c{c}", images, merged, features, features[:, ::-1].copy()))
    context = TableContext.of(suite, reference, dim, pd.Series(ids))
    return units, context


def assert_same(expected: dict, got: dict) -> None:
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        if isinstance(value, (bool, np.bool_, int)):
            assert value == got[name], name
        else:
            np.testing.assert_allclose(got[name], value, rtol=RTOL, atol=0, err_msg=name)


def test_actors_compute_what_the_driver_computes(tmp_path, ray_address):
    units, context = synthetic(tmp_path)
    _, fresh = synthetic(tmp_path)  # the same, none of the reference's parts computed yet
    on_driver = {u.unit_id: config_metrics(u, context) for u in units}
    computed = table_metrics(units, fresh, on_ray=True, actors=2, start_seconds=0)
    on_ray = computed.results
    assert on_ray.keys() == on_driver.keys()
    # the first two on the driver, the others on the actors, each listed with how many it took
    # (an actor still loading when the last one ends took none and is not listed)
    pids = {w["pid"] for w in computed.workers}
    assert 1 <= len(pids) == len(computed.workers) <= 2 and os.getpid() not in pids
    assert sum(w["units"] for w in computed.workers) == len(units) - 2
    for config_id, (columns, replicates) in on_driver.items():
        assert np.isfinite(columns["fid"]) and np.isfinite(columns["kid_mean"])
        assert len(replicates["fid"]) == 30
        assert_same(columns, on_ray[config_id][0])
        assert_same(replicates, on_ray[config_id][1])


def test_actors_read_the_reference_parts_computed_once(tmp_path, ray_address):
    import ray

    units, context = synthetic(tmp_path, configs=2)
    config_metrics(units[0], context)
    computed = set(context.reference.derived)
    assert {"kid", "cmmd", "prdc-radii-5"} <= computed
    # A worker given the prepared context through the object store computes none of them again.
    worker = TableWorker(TableSetup(ray.put(context)))
    derived = worker.context.reference.derived
    before = {k: id(v) for k, v in derived.items()}
    draws = set(derived["kid"]._draws)
    *_, result = worker.run(units[1])
    assert {k: id(v) for k, v in derived.items()} == before
    assert set(derived["kid"]._draws) == draws  # the same KID subsets of the reference
    assert_same(config_metrics(units[1], context)[0], result[0])


def test_evaluate_on_actors_writes_the_drivers_tables(
    evaluated_output, tmp_path, monkeypatch, caplog, ray_address
):
    """evaluate() with actors computing the table (however small it is) writes the tables the
    driver wrote, paired differences and effects included."""
    out = tmp_path / "out"
    shutil.copytree(evaluated_output["out"], out)  # the shards too: nothing is extracted again
    monkeypatch.setattr(table, "ACTOR_START_SECONDS", 0.0)
    with caplog.at_level("INFO", logger="sdbatch"):
        evaluate(str(out), evaluated_output["suite"], address=ray_address)
    assert "2 more configurations on 2 CPU actors" in caplog.text
    driver = evaluated_output["out"] / METRICS_DIR
    # metrics.json lists the table's actors; the driver alone computed the fixture's
    table_workers = json.loads((out / METRICS_DIR / "metrics.json").read_text())["table_workers"]
    assert sum(w["units"] for w in table_workers) == 2 and os.getpid() not in {
        w["pid"] for w in table_workers
    }
    assert json.loads((driver / "metrics.json").read_text())["table_workers"] == []
    for name in ("configs", "replicates", "differences", "effects"):
        expected = pq.read_table(driver / f"{name}.parquet").to_pandas()
        got = pq.read_table(out / METRICS_DIR / f"{name}.parquet").to_pandas()
        assert len(got), name
        pd.testing.assert_frame_equal(got, expected, rtol=RTOL, atol=0, obj=name)


def test_a_small_table_stays_on_the_driver(tmp_path, ray_address, caplog):
    """Actors start in seconds: a table that takes less is computed here, as without Ray."""
    units, context = synthetic(tmp_path)
    with caplog.at_level("INFO", logger="sdbatch"):
        table_metrics(units, context, on_ray=True)
        assert "more configurations on" not in caplog.text
        table_metrics(units, context, on_ray=True, start_seconds=0)
        assert "3 more configurations on 2 CPU actors" in caplog.text
