"""Metric math against independent computations: scipy's sqrtm, numpy's cov, torchmetrics' FID and
a numpy KID, on small random features under fixed seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from sdbatch.evaluation.kid_math import kid
from sdbatch.evaluation.metric_math import (
    FeatureStats,
    FrechetReference,
    bootstrap_samples,
    clip_scores,
    cluster_counts,
    fid,
    frechet_distance,
    normal_interval,
    percentile_interval,
    weighted_mean,
)

DIM = 16


def features(n: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    """n correlated feature vectors (a random linear map of Gaussians), offset by `shift`."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(DIM, DIM)) / math.sqrt(DIM)
    return shift + scale * rng.normal(size=(n, DIM)) @ mix


def gaussian(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(axis=0), np.cov(x, rowvar=False)


def fid_sqrtm(mu1, sigma1, mu2, sigma2) -> float:
    """The pytorch-fid closed form, with scipy's general matrix square root."""
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean).real)


def fid_eigvals(mu1, sigma1, mu2, sigma2) -> float:
    """tr sqrt(S1 S2) as the sum of square roots of the eigenvalues of the unsymmetrised product."""
    diff = mu1 - mu2
    eigenvalues = np.linalg.eigvals(sigma1 @ sigma2).astype(complex)
    tr_sqrt = np.sqrt(eigenvalues).real.sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt)


# ---------------------------------------------------------------------------------------------
# Fréchet distance


@pytest.mark.parametrize("n1, n2", [(300, 200), (10, 200), (200, 10), (6, 9)])
def test_frechet_distance_matches_independent_closed_forms(n1, n2):
    # n < DIM makes that covariance singular (fewer images than feature dimensions).
    mu1, sigma1 = gaussian(features(n1, seed=1))
    mu2, sigma2 = gaussian(features(n2, seed=2, shift=0.5, scale=1.5))
    got = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert got == pytest.approx(fid_eigvals(mu1, sigma1, mu2, sigma2), rel=1e-6)
    if min(n1, n2) > DIM:
        assert got == pytest.approx(fid_sqrtm(mu1, sigma1, mu2, sigma2), rel=1e-6)


def test_fid_matches_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Passthrough(torch.nn.Module):
        num_features = DIM

        def forward(self, x):
            return x

    generated = features(120, seed=3)
    real = features(150, seed=4, shift=0.3, scale=0.8)
    metric = FrechetInceptionDistance(feature=Passthrough())
    metric.update(torch.as_tensor(real, dtype=torch.float64), real=True)
    metric.update(torch.as_tensor(generated, dtype=torch.float64), real=False)
    expected = float(metric.compute())

    got = fid(FeatureStats.of(generated), FrechetReference(*gaussian(real)))
    assert got == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("n", [200, 10])
def test_fid_of_a_set_against_itself_is_zero(n):
    x = features(n, seed=5, shift=1.0)
    stats = FeatureStats.of(x)
    reference = FrechetReference(stats.mean(), stats.covariance())
    scale = float(np.trace(stats.covariance()))
    assert abs(fid(stats, reference)) < 1e-6 * scale


@pytest.mark.parametrize("n1, n2", [(300, 200), (10, 200)])
def test_frechet_distance_is_symmetric(n1, n2):
    a = gaussian(features(n1, seed=6))
    b = gaussian(features(n2, seed=7, shift=-0.4, scale=2.0))
    assert frechet_distance(*a, *b) == pytest.approx(frechet_distance(*b, *a), rel=1e-8)


def test_reference_keeps_its_inputs_and_dim():
    mu, sigma = gaussian(features(50, seed=8))
    reference = FrechetReference(mu.astype(np.float32), sigma.astype(np.float32))
    assert reference.dim == DIM
    assert reference.mu.dtype == np.float64 and reference.sigma.dtype == np.float64


# ---------------------------------------------------------------------------------------------
# Sufficient statistics


SPLITS = [
    [100],
    [50, 50],
    [1, 99],
    [33, 33, 34],
    [1, 1, 1, 97],
    [7, 1, 60, 1, 31],
    [1] * 100,
]


@pytest.mark.parametrize("sizes", SPLITS, ids=lambda sizes: "-".join(map(str, sizes[:6])))
def test_merged_shards_equal_one_pass(sizes):
    x = features(sum(sizes), seed=9, shift=0.7)
    shards = np.split(x, np.cumsum(sizes)[:-1])
    assert [len(shard) for shard in shards] == sizes

    merged = FeatureStats.empty(DIM)
    for shard in shards:
        merged = merged + FeatureStats.of(shard)
    whole = FeatureStats.of(x)

    assert merged.count == whole.count == len(x)
    np.testing.assert_allclose(merged.total, whole.total, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(merged.outer, whole.outer, rtol=1e-12, atol=1e-12)
    reference = FrechetReference(*gaussian(features(80, seed=10, scale=1.3)))
    assert fid(merged, reference) == pytest.approx(fid(whole, reference), rel=1e-9)


def test_empty_is_the_identity():
    stats = FeatureStats.of(features(20, seed=11))
    for merged in (FeatureStats.empty(DIM) + stats, stats + FeatureStats.empty(DIM)):
        assert merged.count == stats.count
        np.testing.assert_array_equal(merged.total, stats.total)
        np.testing.assert_array_equal(merged.outer, stats.outer)
    assert FeatureStats.empty(DIM).dim == DIM


def test_float32_features_accumulate_in_float64():
    x = features(64, seed=12).astype(np.float32)
    stats = FeatureStats.of(x)
    assert stats.total.dtype == np.float64 and stats.outer.dtype == np.float64
    np.testing.assert_array_equal(stats.outer, x.astype(np.float64).T @ x.astype(np.float64))


@pytest.mark.parametrize("n", [2, 3, 10, 500])
def test_mean_and_covariance_match_numpy(n):
    x = features(n, seed=13, shift=2.0)
    stats = FeatureStats.of(x)
    np.testing.assert_allclose(stats.mean(), x.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.covariance(), np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)


def test_covariance_needs_two_vectors():
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats.empty(DIM).covariance()
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats.of(features(1, seed=14)).covariance()


def test_features_must_be_two_dimensional():
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        FeatureStats.of(np.zeros(DIM))


# ---------------------------------------------------------------------------------------------
# CLIP score


def test_clip_scores_match_rowwise_cosine():
    rng = np.random.default_rng(15)
    image = rng.normal(size=(40, 8))
    text = rng.normal(size=(40, 8)) * rng.uniform(0.1, 10, size=(40, 1))
    expected = []
    for a, b in zip(image, text, strict=True):
        cosine = float(np.dot(a, b)) / math.sqrt(float(np.dot(a, a)) * float(np.dot(b, b)))
        expected.append(100 * max(cosine, 0.0))
    got = clip_scores(image, text)
    assert got.shape == (40,)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    # A random set has both signs: the test covers the clipping and the pass-through.
    assert (got == 0).any() and (got > 0).any()


def test_clip_scores_clip_negative_cosines_to_zero():
    rng = np.random.default_rng(16)
    image = rng.normal(size=(5, 8))
    np.testing.assert_array_equal(clip_scores(image, -image), np.zeros(5))
    np.testing.assert_allclose(clip_scores(image, 3 * image), np.full(5, 100.0), rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Bootstrap intervals


def mean_interval(values, samples, confidence, seed):
    """The interval sdbatch gives a mean, each value its own cluster (one image per prompt)."""
    counts = cluster_counts(len(values), samples, seed)
    replicates = [weighted_mean(values, c) for c in counts]
    return percentile_interval(replicates, confidence)


def fid_interval(x, reference, samples, confidence, seed):
    """The interval sdbatch gives FID, each image its own cluster (one image per prompt)."""
    estimate = fid(FeatureStats.of(x), reference) if len(x) >= 2 else math.nan
    counts = cluster_counts(len(x), samples, seed)
    replicates = [fid(FeatureStats.of(x, c), reference) for c in counts]
    return normal_interval(estimate, replicates, confidence)


def test_cluster_counts_count_the_documented_draws():
    counts = cluster_counts(7, 50, seed=9)
    expected = [np.bincount(rows, minlength=7) for rows in bootstrap_samples(7, 50, 9)]
    np.testing.assert_array_equal(counts, expected)
    assert (counts.sum(axis=1) == 7).all()


def test_weighted_statistics_equal_those_of_the_repeated_rows():
    x = features(12, seed=30)
    weights = np.array([0, 2, 1, 0, 3, 1, 1, 0, 1, 2, 0, 1])
    repeated = np.repeat(x, weights, axis=0)
    stats = FeatureStats.of(x, weights)
    assert stats.count == len(repeated) == 12
    np.testing.assert_allclose(stats.mean(), repeated.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.covariance(), np.cov(repeated, rowvar=False), atol=1e-12)
    values = np.where(np.arange(12) == 4, np.nan, x[:, 0])  # image 4 not scored
    keep = weights * ~np.isnan(values)
    assert weighted_mean(values, weights) == pytest.approx(np.repeat(x[:, 0], keep).mean())


def test_mean_interval_is_deterministic_and_brackets_the_mean():
    values = np.random.default_rng(17).normal(5, 2, size=200)
    interval = mean_interval(values, samples=500, confidence=0.95, seed=3)
    assert interval == mean_interval(values, samples=500, confidence=0.95, seed=3)
    assert interval != mean_interval(values, samples=500, confidence=0.95, seed=4)
    low, high = interval
    assert low <= values.mean() <= high


def test_mean_interval_matches_the_normal_approximation():
    # For a large normal sample the percentile bootstrap ~ mean +- z * s / sqrt(n).
    values = np.random.default_rng(18).normal(0, 3, size=2000)
    low, high = mean_interval(values, samples=2000, confidence=0.95, seed=0)
    half = 1.959964 * values.std(ddof=1) / math.sqrt(len(values))
    assert (high - low) / 2 == pytest.approx(half, rel=0.15)
    assert (low + high) / 2 == pytest.approx(values.mean(), abs=0.2 * half)


def test_mean_interval_shrinks_with_more_values_and_grows_with_confidence():
    rng = np.random.default_rng(19)
    small, large = rng.normal(size=50), rng.normal(size=5000)

    def width(values, confidence=0.95):
        low, high = mean_interval(values, samples=400, confidence=confidence, seed=1)
        return high - low

    assert width(large) < width(small) / 4  # sqrt(100) = 10 in expectation
    assert width(small, 0.5) < width(small, 0.9) < width(small, 0.99)


@pytest.mark.parametrize("samples, n", [(0, 100), (100, 1), (100, 0)])
def test_mean_interval_is_nan_without_samples(samples, n):
    low, high = mean_interval(np.ones(n), samples=samples, confidence=0.95, seed=0)
    assert math.isnan(low) and math.isnan(high)


def test_fid_interval_brackets_the_estimate_and_is_deterministic():
    x = features(60, seed=20)
    reference = FrechetReference(*gaussian(features(200, seed=21, shift=0.5)))
    estimate = fid(FeatureStats.of(x), reference)
    low, high = fid_interval(x, reference, samples=40, confidence=0.9, seed=5)
    assert low < estimate < high
    assert (low + high) / 2 == pytest.approx(estimate, rel=1e-12)
    assert fid_interval(x, reference, samples=40, confidence=0.9, seed=5) == (low, high)
    assert fid_interval(x, reference, samples=40, confidence=0.9, seed=6) != (low, high)

    wider = fid_interval(x, reference, samples=40, confidence=0.99, seed=5)
    assert wider[0] < low and high < wider[1]


def test_fid_interval_is_estimate_plus_minus_z_standard_errors():
    # Replicates over the same documented draws, each FID computed independently of sdbatch.
    x = features(40, seed=26)
    y = features(200, seed=27, shift=0.5)
    mu, sigma = gaussian(y)
    replicates = [
        fid_eigvals(*gaussian(x[rows]), mu, sigma) for rows in bootstrap_samples(40, 30, 8)
    ]
    half = 1.959964 * np.std(replicates, ddof=1)
    estimate = fid_eigvals(*gaussian(x), mu, sigma)
    low, high = fid_interval(x, FrechetReference(mu, sigma), samples=30, confidence=0.95, seed=8)
    assert low == pytest.approx(estimate - half, rel=1e-6)
    assert high == pytest.approx(estimate + half, rel=1e-6)


def test_fid_interval_shrinks_with_more_images():
    reference = FrechetReference(*gaussian(features(500, seed=22, shift=0.5)))

    def width(n):
        low, high = fid_interval(features(n, seed=23), reference, 40, 0.95, seed=0)
        return high - low

    assert width(2000) < width(50) / 2


@pytest.mark.parametrize("samples, n", [(0, 50), (1, 50), (40, 1)])
def test_fid_interval_is_nan_without_replicates(samples, n):
    reference = FrechetReference(*gaussian(features(50, seed=24)))
    low, high = fid_interval(features(n, seed=25), reference, samples, 0.95, seed=0)
    assert math.isnan(low) and math.isnan(high)


# ---------------------------------------------------------------------------------------------
# KID

# torchmetrics warns that KID buffers every feature: expected, and the sets here are tiny.
quiet_kid = pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance`:UserWarning")


def mmd_polynomial(x: np.ndarray, y: np.ndarray) -> float:
    """Binkowski et al.'s unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, for equal set sizes."""
    m, d = x.shape
    k_xx = (x @ x.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.mean())


@quiet_kid
def test_kid_matches_numpy_mmd_on_full_sets():
    x = features(40, seed=26)
    y = features(40, seed=27, shift=0.6, scale=1.4)
    mean, std, size = kid(x, y, subsets=1, subset_size=40, seed=0)
    assert size == 40
    assert mean == pytest.approx(mmd_polynomial(x, y), rel=1e-6)
    assert std == 0
    # subset_size above both sizes is lowered to them: the same full-set answer.
    assert kid(x, y, subsets=1, subset_size=1000, seed=9)[0] == pytest.approx(mean, rel=1e-9)


@quiet_kid
def test_kid_lowers_subset_size_to_the_smaller_set():
    x, y = features(15, seed=28), features(30, seed=29, shift=0.5)
    assert kid(x, y, subsets=3, subset_size=100, seed=0)[2] == 15
    assert kid(y, x, subsets=3, subset_size=100, seed=0)[2] == 15
    assert kid(x, y, subsets=3, subset_size=10, seed=0)[2] == 10


@quiet_kid
def test_kid_is_deterministic_per_seed_and_leaves_torch_rng_alone():
    x, y = features(60, seed=30), features(50, seed=31, shift=0.5)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = kid(x, y, subsets=5, subset_size=20, seed=1)
    assert torch.equal(torch.get_rng_state(), before)
    assert kid(x, y, subsets=5, subset_size=20, seed=1) == first
    assert kid(x, y, subsets=5, subset_size=20, seed=2) != first
    assert first[1] > 0


@quiet_kid
def test_kid_needs_two_vectors():
    mean, std, size = kid(features(1, seed=32), features(10, seed=33), 2, 10, seed=0)
    assert size == 1 and math.isnan(mean) and math.isnan(std)


def test_statistics_of_different_dimensions_do_not_merge():
    with pytest.raises(ValueError, match="cannot merge 1-d and 4-d"):
        FeatureStats.of(np.ones((3, 1))) + FeatureStats.of(np.ones((2, 4)))
