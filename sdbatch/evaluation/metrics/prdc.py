"""Precision, recall, density and coverage: k-nearest-neighbour estimates, in the feature space of
the suite's FID extractor, of how much of the generated images lies where reference images lie
(fidelity) and how much of the reference they reach (diversity).

Precision and recall: Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for Assessing
Generative Models". Density and coverage: Naeem et al. 2020, "Reliable Fidelity and Diversity
Metrics for Generative Models". As the authors' code (clovaai/generative-evaluation-prdc) computes
them: Euclidean distances, an image's ball the open ball out to its k-th nearest neighbour in its
own set (k = 5, a suite's `prdc: {k: 5}`).

- precision: the share of generated images inside some reference image's ball;
- recall: the share of reference images inside some generated image's ball;
- density: per generated image, how many reference balls hold it, divided by k, averaged (1 when
  the sets are alike, above 1 where generated images crowd into dense reference regions);
- coverage: the share of reference images whose ball holds some generated image.

Bootstrap replicates (over prompts, `sdbatch.evaluation.metric`): precision and density are means
of per-image values given the reference's fixed balls, so a replicate weighs each image by how
often it was drawn (percentile intervals). Recall and coverage depend on which generated images are
there, not on how often (a repeated image would be its own nearest neighbour): a replicate is
computed on the distinct images drawn, about 63% of the prompts, so it is off the estimate by a
bias (coverage only falls with fewer images); their interval is estimate +- z SE, the SE from these
smaller sets (erring wide).

Cost, for n generated images, m reference images, d dimensions: the reference's radii once per
reference (m^2 d multiply-adds), then n m d + n^2 d per configuration, distances computed in blocks
of at most `BLOCK_BYTES`. Kept per configuration: the (reference, generated) pairs the metrics
read, about k n for coverage (8 bytes each), and for recall (16 bytes each) the reference images
nearer to a generated image than its `SPARE` k-th generated neighbour (16 m in
bench/prdc_scale.py; n m at worst); a replicate then costs O(n `SPARE` k + pairs).

Needs the reference's features: a .npz of mu and sigma alone, or k reference images or fewer,
gives NaN; recall needs more than k generated images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdbatch.evaluation.metric import QUALITY, ConfigGroup, Interval, Metric, Need, Score
from sdbatch.evaluation.metric_math import weighted_mean
from sdbatch.typed_data import conform, within

MAX_K = 1000
# Bounds the memory of a distance computation, whatever the reference's size.
BLOCK_BYTES = 64 * 2**20
# Each generated image keeps its SPARE * k nearest generated neighbours: a replicate finds its k-th
# nearest drawn one among them unless fewer than k of them were drawn; then it is computed from the
# features, at m d per image. With 63% of prompts drawn, P(fewer than 5 of 40) is about 4e-12 (of
# 20, 1e-4: at n 1000 and m 10,000, 12 replicates in 200 fell back, and took 5x longer in all).
SPARE = 8


@dataclass(frozen=True)
class PrdcSettings:
    """The neighbourhood of precision, recall, density and coverage (a suite's `prdc:`)."""

    # Naeem et al.'s choice (Kynkäänniemi et al. use 3); their code's default.
    k: int = 5

    def __post_init__(self) -> None:
        conform(self)
        within(self.k, 1, MAX_K, "k", "the nearest neighbour whose distance is a ball's radius")


def distance_blocks(a: np.ndarray, b: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """Squared Euclidean distances from the rows of `a` to those of `b` in float64, some rows of
    `a` at a time: (index of the block's first row, block). A block, and the rows of `a` it is
    computed from, take at most `BLOCK_BYTES` each."""
    b = np.asarray(b, dtype=np.float64)
    b_norms = np.einsum("ij,ij->i", b, b)
    rows = max(1, BLOCK_BYTES // (8 * max(len(b), a.shape[1], 1)))
    for start in range(0, len(a), rows):
        part = np.asarray(a[start : start + rows], dtype=np.float64)
        d2 = np.einsum("ij,ij->i", part, part)[:, None] + b_norms[None, :] - 2 * part @ b.T
        yield start, np.maximum(d2, 0, out=d2)


def nearest(features: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, its `count` nearest other rows (count < rows), nearest first: (their indices,
    their squared distances)."""
    n = len(features)
    indices, d2s = np.empty((n, count), dtype=np.int64), np.empty((n, count))
    for start, d2 in distance_blocks(features, features):
        rows = np.arange(len(d2))
        d2[rows, start + rows] = np.inf  # not its own neighbour
        part = np.argpartition(d2, count - 1, axis=1)[:, :count]
        near = np.take_along_axis(d2, part, axis=1)
        order = np.argsort(near, axis=1, kind="stable")
        indices[start : start + len(d2)] = np.take_along_axis(part, order, axis=1)
        d2s[start : start + len(d2)] = np.take_along_axis(near, order, axis=1)
    return indices, d2s


def ball_radii(features: np.ndarray, k: int) -> np.ndarray:
    """Per row, the squared distance to its k-th nearest other row: its ball's radius, squared."""
    return nearest(features, k)[1][:, k - 1]


@dataclass(frozen=True)
class Neighbourhoods:
    """A configuration's n generated images among the reference's m, for one k: what the four
    metrics of the configuration and of every bootstrap replicate are computed from."""

    k: int
    references: int  # m
    held: np.ndarray  # (n,) per generated image, how many reference balls hold it
    covering: tuple[np.ndarray, np.ndarray]  # (reference, generated) pairs: inside its ball
    near: np.ndarray  # (n, K) each generated image's K nearest generated images, nearest first
    near_d2: np.ndarray  # (n, K) their squared distances
    # (reference, generated, squared distance): the reference images nearer to the generated one
    # than its K-th nearest generated image, the farthest a replicate's radius reaches unless
    # the image falls back to its features.
    reach: tuple[np.ndarray, np.ndarray, np.ndarray]


def neighbourhoods(
    generated: np.ndarray, reference: np.ndarray, radii: np.ndarray, k: int
) -> Neighbourhoods:
    """The neighbourhoods of `generated` (n x d) among `reference` (m x d), whose balls' squared
    radii are `radii` (`ball_radii`)."""
    n = len(generated)
    count = min(SPARE * k, n - 1)
    if count > 0:
        near, near_d2 = nearest(generated, count)
        farthest = near_d2[:, -1]
    else:  # a single image: no ball, no recall
        near, near_d2, farthest = np.empty((n, 0), dtype=np.int64), np.empty((n, 0)), np.zeros(n)
    covering, reach = ([], []), ([], [], [])
    # int32 indices: the pairs are what a configuration keeps
    for start, d2 in distance_blocks(reference, generated):
        r, g = np.nonzero(d2 < radii[start : start + len(d2), None])
        covering[0].append((r + start).astype(np.int32))
        covering[1].append(g.astype(np.int32))
        r, g = np.nonzero(d2 < farthest[None, :])
        reach[0].append((r + start).astype(np.int32))
        reach[1].append(g.astype(np.int32))
        reach[2].append(d2[r, g])
    inside = (np.concatenate(covering[0]), np.concatenate(covering[1]))
    return Neighbourhoods(
        k=k,
        references=len(reference),
        held=np.bincount(inside[1], minlength=n),
        covering=inside,
        near=near,
        near_d2=near_d2,
        reach=(np.concatenate(reach[0]), np.concatenate(reach[1]), np.concatenate(reach[2])),
    )


def precision_density(hood: Neighbourhoods, weights: np.ndarray | None) -> tuple[float, float]:
    """Precision and density of the generated images, each counted `weights[i]` times."""
    return (
        weighted_mean(hood.held > 0, weights),
        weighted_mean(hood.held, weights) / hood.k,
    )


def coverage(hood: Neighbourhoods, drawn: np.ndarray) -> float:
    """Coverage by the generated images that `drawn` (bool, per image) keeps."""
    if not drawn.any():
        return math.nan
    reference, generated = hood.covering
    return len(np.unique(reference[drawn[generated]])) / hood.references


def recall(
    hood: Neighbourhoods, drawn: np.ndarray, generated: np.ndarray, reference: np.ndarray
) -> float:
    """Recall of the generated images that `drawn` (bool, per image) keeps, their balls' radii
    measured among them."""
    k, kept = hood.k, np.flatnonzero(drawn)
    if len(kept) <= k:
        return math.nan
    # 1. each kept image's radius: its k-th nearest kept neighbour, if among its `near`
    # (more than k kept images: each keeps at least k near neighbours)
    ranks = np.cumsum(drawn[hood.near[kept]], axis=1)
    found = np.zeros(len(drawn), dtype=bool)
    found[kept] = ranks[:, -1] >= k
    at = np.argmax(ranks >= k, axis=1)
    radius = np.full(len(drawn), -np.inf)  # no pair is inside the ball of one not found or kept
    radius[kept] = np.where(found[kept], hood.near_d2[kept, at], -np.inf)
    # 2. the reference images inside those balls, from the pairs kept within reach
    r, g, d2 = hood.reach
    recalled = np.zeros(hood.references, dtype=bool)
    recalled[r[d2 < radius[g]]] = True
    # 3. images with too few of their near neighbours drawn: their balls from the features
    lost = np.flatnonzero(drawn & ~found)
    if len(lost):
        lost_radius = np.empty(len(lost))
        for start, d2 in distance_blocks(generated[lost], generated[kept]):
            rows = np.arange(len(d2))
            d2[rows, np.searchsorted(kept, lost[start : start + len(d2)])] = np.inf
            lost_radius[start : start + len(d2)] = np.partition(d2, k - 1, axis=1)[:, k - 1]
        for start, d2 in distance_blocks(reference, generated[lost]):
            recalled[start : start + len(d2)] |= (d2 < lost_radius[None, :]).any(axis=1)
    return float(recalled.mean())


def _neighbourhoods(group: ConfigGroup, settings: PrdcSettings) -> Neighbourhoods | None:
    """The configuration's neighbourhoods, or None when the reference has no features or too
    few, or the configuration no image."""
    reference = group.reference.features if group.reference is not None else None
    k = settings.k
    if reference is None or len(reference) <= k or len(group.images) == 0:
        return None
    # the reference's radii shared by every configuration, the neighbourhoods by every replicate
    radii = group.per_reference(f"prdc-radii-{k}", lambda: ball_radii(reference, k))
    return group.per_configuration(
        f"prdc-{k}", lambda: neighbourhoods(group.features, reference, radii, k)
    )


def _drawn(group: ConfigGroup) -> np.ndarray:
    """Per image, whether it is in the group (a replicate's distinct drawn images)."""
    if group.weights is None:
        return np.ones(len(group.images), dtype=bool)
    return np.asarray(group.weights) > 0


def aggregate_precision(group: ConfigGroup, settings: PrdcSettings) -> dict[str, Any]:
    hood = _neighbourhoods(group, settings)
    return {"precision": precision_density(hood, group.weights)[0] if hood else math.nan}


def aggregate_density(group: ConfigGroup, settings: PrdcSettings) -> dict[str, Any]:
    hood = _neighbourhoods(group, settings)
    return {"density": precision_density(hood, group.weights)[1] if hood else math.nan}


def aggregate_recall(group: ConfigGroup, settings: PrdcSettings) -> dict[str, Any]:
    hood = _neighbourhoods(group, settings)
    if hood is None:
        return {"recall": math.nan}
    return {"recall": recall(hood, _drawn(group), group.features, group.reference.features)}


def aggregate_coverage(group: ConfigGroup, settings: PrdcSettings) -> dict[str, Any]:
    hood = _neighbourhoods(group, settings)
    return {"coverage": coverage(hood, _drawn(group)) if hood else math.nan}


def _metric(
    name: str,
    aggregate: Callable[[ConfigGroup, Any], dict[str, Any]],
    interval: Interval,
    most: float | None,
) -> Metric:
    return Metric(
        name=name,
        label=name,
        higher_is_better=True,
        # precision and density judge fidelity, recall and coverage diversity: all closeness to
        # the reference set
        judges=QUALITY,
        needs=frozenset({Need.FEATURES, Need.REFERENCE}),
        interval=interval,
        aggregate=aggregate,
        scores=(Score(name, name, digits=3),),
        settings="prdc",
        least=0.0,
        most=most,
    )


# Replicates on the distinct drawn images are biased: percentiles would not bracket the estimate;
# a normal interval of a share could pass 1 but for `most`.
PRECISION = _metric("precision", aggregate_precision, Interval.PERCENTILE, most=1.0)
RECALL = _metric("recall", aggregate_recall, Interval.NORMAL_DISTINCT, most=1.0)
DENSITY = _metric("density", aggregate_density, Interval.PERCENTILE, most=None)  # m / k at most
COVERAGE = _metric("coverage", aggregate_coverage, Interval.NORMAL_DISTINCT, most=1.0)
PRDC = (PRECISION, RECALL, DENSITY, COVERAGE)
