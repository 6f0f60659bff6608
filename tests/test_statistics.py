"""The bootstrap over prompts on synthetic data with a known answer: per-image values are a
configuration's mean, plus a random prompt effect shared by its images (and by every
configuration: the same prompts and seeds), plus image noise. Intervals must reach their nominal
coverage, the paired difference must be narrower than two unpaired intervals, and the numbers
must equal a hand loop over replicates."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.linalg

from sdbatch.evaluation.compare import best_versus_others, compare, main_effects
from sdbatch.evaluation.metric import (
    Bootstrap,
    ConfigGroup,
    Interval,
    aggregate_with_intervals,
)
from sdbatch.evaluation.metric_math import (
    FeatureStats,
    FrechetReference,
    cluster_counts,
    percentile_interval,
)
from sdbatch.evaluation.metrics.clip_score import CLIP_SCORE
from sdbatch.evaluation.metrics.fid import FID

# The percentile bootstrap runs a little narrow with few clusters (its SE is off by
# sqrt((P - 1) / P), and z stands in for t): about 93% at 40 prompts, 94.5% at 80.
PROMPTS, IMAGES, SAMPLES, EXPERIMENTS = 80, 4, 300, 400


def experiment(rng, means=(0.0,), prompt_sd=1.0, image_sd=1.0, shared_sd=0.0):
    """Per configuration, (PROMPTS * IMAGES,) values; images in prompt order. `shared_sd` is
    the image-level part all configurations share (same seed)."""
    prompt = np.repeat(rng.normal(0, prompt_sd, PROMPTS), IMAGES)
    shared = rng.normal(0, shared_sd, PROMPTS * IMAGES)
    noise = rng.normal(0, image_sd, (len(means), PROMPTS * IMAGES))
    return [m + prompt + shared + e for m, e in zip(means, noise, strict=True)]


def replicate_means(values, clusters, counts):
    """Each replicate's mean: every value counted as often as its cluster was drawn."""
    weights = counts[:, clusters]
    return (weights @ values) / weights.sum(axis=1)


PROMPT_OF_IMAGE = np.repeat(np.arange(PROMPTS), IMAGES)


def coverage(interval_of, truth):
    rng = np.random.default_rng(0)
    hits = 0
    for seed in range(EXPERIMENTS):
        low, high = interval_of(rng, seed)
        hits += low <= truth <= high
    return hits / EXPERIMENTS


def test_the_prompt_bootstrap_reaches_nominal_coverage_and_the_image_bootstrap_does_not():
    def by_prompt(rng, seed):
        (values,) = experiment(rng, means=(5.0,))
        counts = cluster_counts(PROMPTS, SAMPLES, seed)
        return percentile_interval(replicate_means(values, PROMPT_OF_IMAGE, counts), 0.95)

    def by_image(rng, seed):
        (values,) = experiment(rng, means=(5.0,))
        counts = cluster_counts(len(values), SAMPLES, seed)
        return percentile_interval(replicate_means(values, np.arange(len(values)), counts), 0.95)

    assert coverage(by_prompt, 5.0) == pytest.approx(0.95, abs=0.03)
    # 4 images per prompt sharing half their variance: the image bootstrap's standard error is
    # sqrt(1 + 3 * 0.5) = 1.6 times too small, so its "95%" interval covers about 78%.
    assert coverage(by_image, 5.0) < 0.85


def test_the_paired_difference_is_narrower_than_the_unpaired_one_and_covers():
    widths = {"paired": [], "unpaired": []}

    def paired(rng, seed):
        a, b = experiment(rng, means=(5.0, 5.5), shared_sd=1.0)
        counts = cluster_counts(PROMPTS, SAMPLES, seed)
        drawn = replicate_means(b, PROMPT_OF_IMAGE, counts) - replicate_means(
            a, PROMPT_OF_IMAGE, counts
        )
        low, high = Interval.PERCENTILE.bounds(b.mean() - a.mean(), drawn, 0.95)
        # unpaired: each configuration resampled on draws of its own
        other = cluster_counts(PROMPTS, SAMPLES, seed + EXPERIMENTS)
        unpaired = replicate_means(b, PROMPT_OF_IMAGE, other) - replicate_means(
            a, PROMPT_OF_IMAGE, counts
        )
        u_low, u_high = percentile_interval(unpaired, 0.95)
        widths["paired"].append(high - low)
        widths["unpaired"].append(u_high - u_low)
        return low, high

    assert coverage(paired, 0.5) == pytest.approx(0.95, abs=0.03)
    # The prompt and seed parts cancel in a paired difference: only image noise is left.
    assert np.mean(widths["paired"]) < 0.5 * np.mean(widths["unpaired"])


# ---------------------------------------------------------------------------------------------
# The numbers, against a hand loop over replicates

SMALL_PROMPTS, SMALL_IMAGES, B, SEED = 5, 2, 40, 7
GRID = [(s, n) for s in ("ddim", "euler") for n in (3, 20)]  # scheduler x steps


@pytest.fixture(scope="module")
def small():
    """Four configurations of 5 prompts x 2 images: CLIP scores and 3-d features."""
    rng = np.random.default_rng(11)
    prompt_ids = [f"p{i}" for i in np.repeat(np.arange(SMALL_PROMPTS), SMALL_IMAGES)]
    real = rng.normal(0.3, 1.0, (50, 3))
    frechet = FrechetReference(real.mean(axis=0), np.cov(real, rowvar=False))
    return {
        "prompt_ids": prompt_ids,
        "frechet": frechet,
        "configs": {
            f"{s}-{n}": {
                "scheduler": s,
                "num_inference_steps": n,
                "clip_score": 20 + (n == 20) * 3 + rng.normal(0, 1, len(prompt_ids)),
                "features": rng.normal(0, 1 + (s == "euler"), (len(prompt_ids), 3)),
            }
            for s, n in GRID
        },
    }


def evaluated(small):
    """configs and replicates tables as evaluation writes them, through the generic path."""
    bootstrap = Bootstrap(samples=B, seed=SEED)
    prompts = pd.Index(sorted(set(small["prompt_ids"])))
    draws = cluster_counts(len(prompts), B, SEED)
    rows, replicates = [], []
    for config_id, c in small["configs"].items():
        images = pd.DataFrame({"prompt_id": small["prompt_ids"], "clip_score": c["clip_score"]})
        group = ConfigGroup(
            config_id=config_id,
            images=images,
            merged=FeatureStats.of(c["features"]),
            reference=None,
            frechet=small["frechet"],
            feature_dim=3,
            bootstrap=bootstrap,
            load_features=lambda c=c: c["features"],
        )
        weights = draws[:, prompts.get_indexer(images["prompt_id"])]
        row = {"config_id": config_id, "scheduler": c["scheduler"]}
        row["num_inference_steps"] = c["num_inference_steps"]
        row["guidance_scale"] = 1.0
        drawn = {"config_id": config_id, "replicate": np.arange(B)}
        for metric in (CLIP_SCORE, FID):
            columns, resampled = aggregate_with_intervals(metric, group, None, weights)
            row.update(columns)
            drawn.update(resampled)
        rows.append(row)
        replicates.append(pd.DataFrame(drawn))
    return pd.DataFrame(rows), pd.concat(replicates)


def hand_replicates(small):
    """Per configuration, per replicate: CLIP score and FID over the images of the drawn
    prompts, each computed from scratch (np.cov, scipy's sqrtm)."""
    draws = np.random.default_rng(SEED).integers(0, SMALL_PROMPTS, size=(B, SMALL_PROMPTS))
    prompt_of = np.array([int(p[1:]) for p in small["prompt_ids"]])
    mu2, sigma2 = small["frechet"].mu, small["frechet"].sigma
    out = {}
    for config_id, c in small["configs"].items():
        clip, fid = [], []
        for draw in draws:
            rows = np.concatenate([np.flatnonzero(prompt_of == p) for p in draw])
            clip.append(c["clip_score"][rows].mean())
            x = c["features"][rows]
            mu1, sigma1 = x.mean(axis=0), np.cov(x, rowvar=False)
            covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
            d = mu1 - mu2
            fid.append(d @ d + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
        out[config_id] = {"clip_score": np.array(clip), "fid": np.array(fid)}
    return out


def test_intervals_and_differences_equal_a_hand_loop(small):
    configs, replicates = evaluated(small)
    hand = hand_replicates(small)
    configs = configs.set_index("config_id")
    for config_id, expected in hand.items():
        stored = replicates[replicates["config_id"] == config_id]
        np.testing.assert_allclose(stored["clip_score"], expected["clip_score"], rtol=1e-12)
        np.testing.assert_allclose(stored["fid"], expected["fid"], rtol=1e-6)
        low, high = np.quantile(expected["clip_score"], [0.025, 0.975])
        assert configs.loc[config_id, "clip_score_low"] == pytest.approx(low, rel=1e-12)
        assert configs.loc[config_id, "clip_score_high"] == pytest.approx(high, rel=1e-12)
        half = 1.959964 * np.std(expected["fid"], ddof=1)
        assert configs.loc[config_id, "fid_high"] - configs.loc[config_id, "fid"] == (
            pytest.approx(half, rel=1e-5)
        )

    # any two configurations: b - a, from replicates on the same prompts
    d = compare(configs.reset_index(), replicates, "ddim-3", "euler-20", "fid", 0.9)
    fid_diff = hand["euler-20"]["fid"] - hand["ddim-3"]["fid"]
    estimate = configs.loc["euler-20", "fid"] - configs.loc["ddim-3", "fid"]
    assert d.difference == pytest.approx(estimate, rel=1e-12)
    assert d.high - d.difference == pytest.approx(1.644854 * np.std(fid_diff, ddof=1), rel=1e-5)


def test_the_best_is_compared_with_every_other_at_the_family_wise_level(small):
    configs, replicates = evaluated(small)
    hand = hand_replicates(small)
    table = best_versus_others(configs, replicates, 0.95)
    clip = table[table["metric"] == "clip_score"]
    estimates = configs.set_index("config_id")["clip_score"]
    best = estimates.idxmax()
    assert (clip["best"] == best).all() and sorted(clip["other"]) == sorted(
        estimates.index.drop(best)
    )
    # 3 comparisons: each interval at 1 - 0.05 / 3, so that all three hold together at 95%
    assert np.allclose(clip["confidence"], 1 - 0.05 / 3) and (clip["comparisons"] == 3).all()
    for _, row in clip.iterrows():
        diff = hand[row["other"]]["clip_score"] - hand[best]["clip_score"]
        low, high = np.quantile(diff, [0.05 / 6, 1 - 0.05 / 6])
        assert (row["low"], row["high"]) == pytest.approx((low, high), rel=1e-12)
        assert row["worse"] == (high < 0)
    fid = table[table["metric"] == "fid"]
    assert fid["best"].iloc[0] == configs.set_index("config_id")["fid"].idxmin()
    assert len(fid) == 3


def test_main_effects_average_over_the_other_axes(small):
    configs, replicates = evaluated(small)
    hand = hand_replicates(small)
    effects = main_effects(configs, replicates, 0.95)
    # guidance has one level: no effect to show
    assert set(effects["axis"]) == {"scheduler", "num_inference_steps"}
    steps = effects[effects["axis"] == "num_inference_steps"]
    level = steps[steps["column"] == "clip_score"].set_index("level")
    estimates = configs.set_index("config_id")["clip_score"]
    assert level.loc["20", "mean"] == pytest.approx(
        (estimates["ddim-20"] + estimates["euler-20"]) / 2
    )
    assert level.loc["3", "baseline"] == "3" and np.isnan(level.loc["3", "difference"])
    drawn = (
        hand["ddim-20"]["clip_score"]
        + hand["euler-20"]["clip_score"]
        - hand["ddim-3"]["clip_score"]
        - hand["euler-3"]["clip_score"]
    ) / 2
    low, high = np.quantile(drawn, [0.025, 0.975])  # 2 levels: one comparison, no adjustment
    assert (level.loc["20", "difference_low"], level.loc["20", "difference_high"]) == (
        pytest.approx((low, high), rel=1e-12)
    )
    # the synthetic steps effect is +3: the interval sees it
    assert level.loc["20", "difference_low"] > 0


def test_an_fid_interval_stops_at_zero_and_a_difference_does_not():
    replicates = np.array([0.2, 3.0, 5.5, 1.1, 4.2, 0.7])  # spread wide against a small FID
    low, high = Interval.NORMAL.bounds(0.5, replicates, 0.95)
    assert low < 0  # estimate - z * SE
    assert FID.bounds(0.5, replicates, 0.95) == (0.0, high)
    assert CLIP_SCORE.bounds(0.5, replicates - 10, 0.95) == Interval.PERCENTILE.bounds(
        0.5, replicates - 10, 0.95
    )  # a score without a least value keeps its interval
    # a difference of FIDs can be negative: its interval is the method's, unraised
    configs = pd.DataFrame({"config_id": ["a", "b"], "fid": [2.0, 1.0]})
    drawn = pd.DataFrame(
        {"config_id": ["a"] * 6 + ["b"] * 6, "replicate": [*range(6)] * 2,
         "fid": [*(replicates + 1.5), *(replicates + 0.4)]}
    )  # fmt: skip
    d = compare(configs, drawn, "a", "b", "fid", 0.95)
    assert d.high < 0 or d.low < 0
    assert (d.low, d.high) == Interval.NORMAL.bounds(-1.0, np.full(6, -1.1), 0.95)
