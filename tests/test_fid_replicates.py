"""FID's bootstrap replicates, all computed at once from the features projected by the reference's
square root (`FrechetResamples`), equal the direct computation on the same resamples (weighted
statistics, a covariance and a d x d eigensolve each); and evaluation stores those numbers."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from sdbatch.evaluation.metric import Bootstrap, ConfigGroup, aggregate_with_intervals
from sdbatch.evaluation.metric_math import (
    FeatureStats,
    FrechetReference,
    FrechetResamples,
    cluster_counts,
    fid,
)
from sdbatch.evaluation.metrics.fid import FID
from sdbatch.evaluation.reference import load_stats
from sdbatch.evaluation.shards import read_npz

REPLICATES = 40


def features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """n correlated d-dimensional vectors, away from the origin (as real features are)."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mixing + 3.0 + shift


def reference(d: int, seed: int = 100) -> FrechetReference:
    real = features(4 * d, d, seed, shift=0.4)
    return FrechetReference(real.mean(axis=0), np.cov(real, rowvar=False))


def direct(x: np.ndarray, frechet: FrechetReference, weights: np.ndarray) -> np.ndarray:
    """Each replicate as the generic loop computes it: weighted statistics, then a distance."""
    return np.array(
        [fid(FeatureStats.of(x, w), frechet) if round(w.sum()) >= 2 else np.nan for w in weights]
    )


def prompt_weights(images: int, per_prompt: int, seed: int) -> np.ndarray:
    """Replicates of the bootstrap over prompts: all images of a prompt share its count."""
    return np.repeat(cluster_counts(images // per_prompt, REPLICATES, seed), per_prompt, axis=1)


@pytest.mark.parametrize(
    "n, d",
    [(32, 50), (200, 20), (64, 40)],
    ids=["fewer-images-than-dimensions", "more-images", "both-paths"],
)
@pytest.mark.parametrize("per_prompt", [1, 4])
def test_replicates_equal_the_direct_computation(n, d, per_prompt):
    x, frechet = features(n, d, seed=n), reference(d)
    weights = prompt_weights(n, per_prompt, seed=d)
    drawn = (weights > 0).sum(axis=1)
    if n == 64:  # some replicates take the k x k path, some the d x d one
        assert drawn.min() < d <= drawn.max()
    got = FrechetResamples(x, frechet).distances(weights)
    np.testing.assert_allclose(got, direct(x, frechet, weights), rtol=1e-6)


def test_weights_with_zeros_and_too_few_images():
    n, d = 12, 8
    x, frechet = features(n, d, seed=1), reference(d)
    rng = np.random.default_rng(2)
    weights = rng.integers(0, 3, size=(20, n)) * (rng.random((20, n)) < 0.4)
    one, twice, none = np.zeros((3, n), dtype=np.int64)
    one[3], twice[5] = 1, 2  # a single image, and one image drawn twice
    weights = np.vstack([weights, one, twice, none])
    got = FrechetResamples(x, frechet).distances(weights)
    expected = direct(x, frechet, weights)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert np.isnan(got[-3]) and np.isfinite(got[-2]) and np.isnan(got[-1])


def test_a_configuration_without_images_has_no_replicates():
    frechet = reference(5)
    got = FrechetResamples(np.empty((0, 5)), frechet).distances(np.empty((3, 0)))
    assert np.isnan(got).all()


def test_weights_of_the_wrong_shape_are_refused():
    resamples = FrechetResamples(features(10, 4, seed=3), reference(4))
    with pytest.raises(ValueError, match=r"weights must be \(replicates, 10\)"):
        resamples.distances(np.ones((2, 9)))


@pytest.mark.parametrize("n, d", [(15, 30), (60, 10)])
def test_the_hook_gives_the_per_replicate_loop_s_row_and_replicates(n, d):
    x, frechet = features(n, d, seed=7), reference(d)
    group = ConfigGroup(
        config_id="c",
        images=pd.DataFrame({"prompt_id": [f"p{i // 3}" for i in range(n)]}),
        merged=FeatureStats.of(x),
        reference=None,
        frechet=frechet,
        feature_dim=d,
        bootstrap=Bootstrap(samples=REPLICATES),
        load_features=lambda: x,
    )
    weights = prompt_weights(n, 3, seed=4)
    looped = dataclasses.replace(FID, replicates=None)
    row, replicates = aggregate_with_intervals(FID, group, None, weights)
    loop_row, loop_replicates = aggregate_with_intervals(looped, group, None, weights)
    np.testing.assert_allclose(replicates["fid"], loop_replicates["fid"], rtol=1e-6)
    assert row.keys() == loop_row.keys()
    for column in ("fid", "fid_low", "fid_high"):
        assert row[column] == pytest.approx(loop_row[column], rel=1e-6)
    # the estimate, through the n x n path when n < d, against the merged statistics
    assert row["fid"] == pytest.approx(fid(FeatureStats.of(x), frechet), rel=1e-6)
    assert row["fid_ill_conditioned"] == (n < d)


def test_evaluation_stores_the_directly_computed_fid_and_its_replicates(evaluated_output):
    out, b = evaluated_output["out"], evaluated_output["suite"].bootstrap
    configs = pd.read_parquet(out / "metrics" / "configs.parquet").set_index("config_id")
    stored = pd.read_parquet(out / "metrics" / "replicates.parquet")
    record = json.loads((out / "metrics" / "metrics.json").read_text())
    real = load_stats(record["reference"]["cache"])
    frechet = FrechetReference(real.mu, real.sigma)
    shards = [read_npz(str(p)) for p in (out / "metrics" / "_shards").glob("*/*.npz")]
    prompt_of = np.concatenate([s["prompt_id"] for s in shards])
    config_of = np.concatenate([s["config_id"] for s in shards])
    every = np.concatenate([s["features"] for s in shards])
    prompts = pd.Index(sorted(set(prompt_of)))
    draws = cluster_counts(len(prompts), b.samples, b.seed)
    assert (configs["n_excluded"] == 0).all()  # so every image of the shards counts
    for config_id, row in configs.iterrows():
        mine = config_of == config_id
        x = every[mine]
        assert len(x) < x.shape[1]  # the estimate and the replicates take the k x k path
        weights = draws[:, prompts.get_indexer(prompt_of[mine])]
        expected = direct(x, frechet, weights)
        got = stored[stored["config_id"] == config_id].sort_values("replicate")["fid"]
        np.testing.assert_allclose(got, expected, rtol=1e-6)
        estimate = fid(FeatureStats.of(x), frechet)
        assert row["fid"] == pytest.approx(estimate, rel=1e-6)
        low, high = FID.bounds(estimate, expected, b.confidence)
        assert (row["fid_low"], row["fid_high"]) == pytest.approx((low, high), rel=1e-6)
