"""Precision, recall, density and coverage against a straightforward implementation of the papers'
formulas (full distance matrices, loops), on their own, in bootstrap replicates, and through an
evaluation into configs.parquet and the report."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import suite_data

from sdbatch.errors import InputError
from sdbatch.evaluation.metric import Bootstrap, ConfigGroup, Interval, aggregate_with_intervals
from sdbatch.evaluation.metric_math import FeatureStats, cluster_counts
from sdbatch.evaluation.metrics import prdc
from sdbatch.evaluation.metrics.prdc import PRDC, PrdcSettings
from sdbatch.evaluation.reference import ReferenceStats
from sdbatch.evaluation.run import evaluate
from sdbatch.evaluation.shards import read_shard
from sdbatch.evaluation.suite import parse_suite
from sdbatch.reporting.write import write_report

NAMES = ("precision", "recall", "density", "coverage")


def direct(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """Kynkäänniemi et al. 2019 and Naeem et al. 2020, as clovaai/generative-evaluation-prdc
    computes them: a point's radius is its (k+1)-th smallest distance in its own set (itself at 0
    the first), and "inside" is strictly nearer than the radius. Recall of k images or fewer: NaN
    (no radius)."""

    def distances(a, b):
        return np.array([[np.sqrt(((x - y) ** 2).sum()) for y in b] for x in a])

    real_radius = [sorted(row)[k] for row in distances(real, real)]
    fake_radius = [sorted(row)[k] if len(fake) > k else np.nan for row in distances(fake, fake)]
    d = distances(real, fake)  # (real, fake)
    inside_real = [[d[i, j] < real_radius[i] for j in range(len(fake))] for i in range(len(real))]
    inside_fake = [[d[i, j] < fake_radius[j] for j in range(len(fake))] for i in range(len(real))]
    return {
        "precision": np.mean([any(row[j] for row in inside_real) for j in range(len(fake))]),
        "recall": np.mean([any(row) for row in inside_fake]) if len(fake) > k else np.nan,
        "density": np.mean([sum(row[j] for row in inside_real) for j in range(len(fake))]) / k,
        "coverage": np.mean([min(d[i]) < real_radius[i] for i in range(len(real))]),
    }


def group_of(fake: np.ndarray, real: np.ndarray | None, samples: int = 0) -> ConfigGroup:
    stats = FeatureStats.of(real if real is not None else fake)
    reference = ReferenceStats(stats.mean(), stats.covariance(), stats.count, real)
    return ConfigGroup(
        config_id="c",
        images=pd.DataFrame({"prompt_id": np.arange(len(fake)) // 2}),  # two images a prompt
        merged=FeatureStats.of(fake),
        reference=reference,
        frechet=None,
        feature_dim=fake.shape[1],
        bootstrap=Bootstrap(samples=samples),
        load_features=lambda: fake,
    )


def computed(fake: np.ndarray, real: np.ndarray | None, k: int) -> dict[str, float]:
    group, settings = group_of(fake, real), PrdcSettings(k=k)
    return {m.name: m.aggregate(group, settings)[m.name] for m in PRDC}


@pytest.fixture
def small_blocks(monkeypatch):
    """Distance blocks of a few rows, so that the computations cross block boundaries."""
    monkeypatch.setattr(prdc, "BLOCK_BYTES", 8 * 40 * 3)


@pytest.mark.parametrize("others", [1, 500])
def test_distances_come_in_blocks_of_bounded_size(others, monkeypatch):
    monkeypatch.setattr(prdc, "BLOCK_BYTES", 8 * 64 * 10)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(100, 64)).astype(np.float32), rng.normal(size=(others, 64))
    blocks = list(prdc.distance_blocks(a, b))
    # neither a block of distances nor the rows of `a` in float64 it is made from pass the bound
    assert max(len(block) * max(others, 64) * 8 for _, block in blocks) <= prdc.BLOCK_BYTES
    assert [start for start, _ in blocks] == list(range(0, 100, len(blocks[0][1])))
    expected = ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(axis=2)
    assert np.allclose(np.concatenate([block for _, block in blocks]), expected)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_equals_the_formulas_on_random_sets(k, small_blocks):
    rng = np.random.default_rng(k)
    real = rng.normal(size=(40, 6))
    fake = rng.normal(0.4, 1.0, size=(30, 6))  # shifted: every share strictly inside (0, 1)
    expected = direct(real, fake, k)
    assert all(0 < expected[n] < 1 for n in ("precision", "recall", "coverage")), expected
    assert computed(fake, real, k) == pytest.approx(expected, abs=1e-12)


def test_known_answers():
    real = np.random.default_rng(0).normal(size=(50, 8))
    # the same set: every image in its own ball; density 1 exactly (each ball holds its k
    # nearest but the k-th, which is on its edge, and itself)
    assert computed(real.copy(), real, 5) == pytest.approx(dict.fromkeys(NAMES, 1.0), abs=1e-12)
    # far apart: no image in the other set's balls
    assert computed(real + 100, real, 5) == dict.fromkeys(NAMES, 0.0)
    # half the generated images are real ones, half far off: precision halves, density too
    half = np.concatenate([real[:25], real[:25] + 100])
    assert computed(half, real, 5) == pytest.approx(direct(real, half, 5), abs=1e-12)
    assert computed(half, real, 5)["precision"] == 0.5


def test_without_the_reference_features_or_enough_images_the_numbers_are_nan():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(20, 4)), rng.normal(size=(10, 4))
    assert all(np.isnan(v) for v in computed(fake, None, 5).values())  # a .npz of mu and sigma
    assert all(np.isnan(v) for v in computed(fake, real[:5], 5).values())  # no 5th neighbour
    few = computed(fake[:5], real, 5)  # recall needs each generated image's 5th neighbour
    assert np.isnan(few["recall"])
    assert few["precision"] == pytest.approx(direct(real, fake[:5], 5)["precision"])


@pytest.mark.parametrize("spare", [prdc.SPARE, 1])  # 1: most recall replicates need features
def test_replicates_equal_the_formulas_on_what_each_replicate_drew(spare, monkeypatch):
    monkeypatch.setattr(prdc, "SPARE", spare)
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(40, 5)), rng.normal(0.3, 1.1, size=(30, 5))
    group, k = group_of(fake, real, samples=25), 3
    draws = cluster_counts(15, 25, seed=0)
    weights = draws[:, group.images["prompt_id"]]
    for metric in PRDC:
        row, replicates = aggregate_with_intervals(metric, group, PrdcSettings(k=k), weights)
        name = metric.name
        for w, value in zip(weights, replicates[name], strict=True):
            if name in ("precision", "density"):  # each image as often as it was drawn
                assert value == pytest.approx(direct(real, np.repeat(fake, w, axis=0), k)[name])
            else:  # the distinct images drawn
                assert value == pytest.approx(direct(real, fake[w > 0], k)[name]), name
        assert row[f"{name}_low"] <= row[name] <= row[f"{name}_high"]
        if metric.interval is Interval.NORMAL_DISTINCT:
            assert row[f"{name}_low"] >= 0 and row[f"{name}_high"] <= 1
        # the replicates vary, so the interval is not a point
        assert np.std(replicates[name]) > 0


def test_k_is_checked_when_the_suite_is_read(tmp_path):
    data = suite_data(tmp_path, tmp_path / "cache", metrics=["precision"], prdc={"k": 0})
    with pytest.raises(InputError, match=r"^prdc\.k: must be between 1 and 1,000"):
        parse_suite(data)


def test_an_evaluation_writes_them_with_intervals_and_the_report_shows_them(
    evaluated_output, tmp_path, ray_address
):
    out = tmp_path / "out"
    shutil.copytree(evaluated_output["out"], out, ignore=shutil.ignore_patterns("metrics"))
    cache = tmp_path / "cache"  # holding only this reference's statistics
    data = suite_data(evaluated_output["reference"], cache, metrics=list(NAMES))
    configs = evaluate(str(out), parse_suite(data), address=ray_address).configs

    # 1. each configuration's numbers are the formulas' on its features and the reference's
    shards = [read_shard(str(p)) for p in (out / "metrics" / "_shards").rglob("*.npz")]
    features = np.concatenate([s["features"] for s in shards])
    config_ids = np.concatenate([s["config_id"] for s in shards])
    (cached,) = cache.glob("*.npz")
    real = read_shard(str(cached))["features"]
    assert len(configs) == 4
    for _, row in configs.iterrows():
        expected = direct(real, features[config_ids == row["config_id"]], 5)
        assert {n: row[n] for n in NAMES} == pytest.approx(expected, abs=1e-9)
        for name in NAMES:
            assert row[f"{name}_low"] <= row[name] <= row[f"{name}_high"], name
    assert list(configs.columns)[-12:] == [f"{n}{s}" for n in NAMES for s in ("", "_low", "_high")]

    # 2. the report's table and its best-by lines
    write_report(str(out))
    report = (out / "report" / "report.md").read_text()
    for name in NAMES:
        assert f"| {name} [CI] |" in report and f"Best by {name}:" in report
    assert "recall: estimate +- z * SE" in report and "on the distinct images" in report
