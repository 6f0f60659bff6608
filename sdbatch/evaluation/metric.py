"""What a metric is: one declaration that evaluation and the report both read.

A `Metric` says, once: its name in suites and its label; whether higher is better; what it needs
(CLIP, the extractor's features, a reference, the world judge); the per-image columns it writes
into shards and images.parquet, and how a worker scores them; how one configuration aggregates
into numbers on the driver, and how their interval is computed; and the columns and plots the
report shows. `sdbatch.evaluation.registry` lists them.

Intervals come from one bootstrap over prompts for every metric: a replicate draws the run's
prompts with replacement and takes all their images (the cluster bootstrap of Davison & Hinkley
1997, sec. 3.8), and a metric's `aggregate` computes it as if the drawn images were the
configuration's. Images of one prompt are correlated, so resampling images would give intervals
too narrow; with one image per prompt the two coincide. Every configuration is resampled on the
same draws, which pairs them (`sdbatch.evaluation.compare`).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from sdbatch.evaluation.clip import ClipEncoder
from sdbatch.evaluation.metric_math import (
    FeatureStats,
    FrechetReference,
    FrechetResamples,
    normal_interval,
    percentile_interval,
    weighted_mean,
)
from sdbatch.evaluation.reference import ReferenceStats
from sdbatch.evaluation.sources import Source
from sdbatch.spec import MAX_SEED
from sdbatch.typed_data import conform, require, within

if TYPE_CHECKING:  # feature workers unpickle metrics and never need pandas: a slower start
    import pandas as pd


class Need(enum.Enum):
    """What a metric is computed from; evaluation loads only what the suite's metrics need."""

    CLIP = "the suite's CLIP model (image and text embeddings)"
    # Kept, unlike CLIP score's, which are used in the worker and dropped.
    EMBEDDINGS = "CLIP image embeddings of the generated and the reference images, kept"
    FEATURES = "the feature extractor's features (fid.features)"
    REFERENCE = "statistics of real images (reference)"
    JUDGE = "the shapes world's pixel judge (no model)"
    # image-conditioned runs only: a text2img output has none
    SOURCES = "the source image each image was made from (the output's sources.parquet)"


class Interval(enum.Enum):
    """How a metric's confidence interval is computed, in words (metrics.json and the report)."""

    PERCENTILE = "percentile bootstrap over prompts (each drawn with all its images)"
    NORMAL = (
        "estimate +- z * SE, SE the standard deviation of bootstrap replicates over prompts, "
        "each drawn with all its images (the reference held fixed)"
    )
    # for statistics of which images are present, not how often (recall, coverage)
    NORMAL_DISTINCT = (
        "estimate +- z * SE, SE the standard deviation of bootstrap replicates over prompts, each "
        "computed on the distinct images of the prompts drawn (the reference held fixed)"
    )
    NONE = "none; the spread over random subsets is given instead"

    def bounds(
        self, estimate: float, replicates: np.ndarray, confidence: float
    ) -> tuple[float, float]:
        """The interval of `estimate` from its bootstrap replicates, by this method."""
        if self is Interval.PERCENTILE:
            return percentile_interval(replicates, confidence)
        if self in (Interval.NORMAL, Interval.NORMAL_DISTINCT):
            return normal_interval(estimate, replicates, confidence)
        raise ValueError(f"{self.name}: a metric without intervals has no replicates")


# Intervals settle within a few hundred resamples; each one recomputes every metric.
MAX_BOOTSTRAP = 10_000
# What a bootstrap replicate draws (metrics.json): see the module docstring.
RESAMPLING_UNIT = "prompt"


@dataclass(frozen=True)
class Bootstrap:
    """Bootstrap confidence intervals over prompts (a suite's `bootstrap:`)."""

    samples: int = 200  # 0 turns intervals off
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        conform(self)
        within(self.samples, 0, MAX_BOOTSTRAP, "samples", "0 turns intervals off")
        require(0 < self.confidence < 1, "confidence", "must be between 0 and 1, e.g. 0.95")
        within(self.seed, 0, MAX_SEED, "seed")


@dataclass(frozen=True)
class Score:
    """A number per configuration that the report shows: a column of configs.parquet."""

    column: str
    label: str
    interval: bool = True  # <column>_low and <column>_high hold its confidence interval
    spread: str | None = None  # a column shown after it as +- (KID's std over subsets)
    digits: int = 2

    @property
    def header(self) -> str:
        return self.label + (" [CI]" if self.interval else "")

    def cell(self, row: Mapping[str, Any]) -> str:
        """The value as the report prints it: with its interval or spread, or n/a."""
        import pandas as pd

        value = row.get(self.column)
        if value is None or pd.isna(value):
            return "n/a"
        text = f"{value:.{self.digits}f}"
        low, high = row.get(f"{self.column}_low"), row.get(f"{self.column}_high")
        if self.interval and low is not None and not pd.isna(low):
            text += f" [{low:.{self.digits}f}, {high:.{self.digits}f}]"
        if self.spread is not None and not pd.isna(row.get(self.spread, math.nan)):
            text += f" ± {row[self.spread]:.{self.digits}f}"
        return text


@dataclass(frozen=True)
class UnitImages:
    """What a metric scores in a worker: one generated unit's images, with their prompts."""

    images: list[np.ndarray]  # H x W x 3 uint8
    prompts: list[str]
    clip: ClipEncoder | None  # loaded when a metric needs CLIP
    image_embeddings: np.ndarray | None  # the images' CLIP embeddings, when CLIP is loaded
    # per image, what it was made from (None: nothing); empty unless a metric needs sources
    sources: list[Source | None] = field(default_factory=list)

    @property
    def made_from(self) -> list[Source | None]:
        """Per image, its source, or None (every one when the unit was read without sources)."""
        return self.sources or [None] * len(self.images)


@dataclass
class ConfigGroup:
    """What a metric aggregates on the driver: the images of one configuration that count (those
    the safety checker flagged are left out under `safety: exclude`), each counted once, or as
    often as a bootstrap replicate drew it (`weights`)."""

    config_id: str
    images: pd.DataFrame  # their per-image columns
    merged: FeatureStats | None  # their features' statistics from the shards (None: no extractor)
    reference: ReferenceStats | None
    frechet: FrechetReference | None  # the reference's Gaussian, its square root computed once
    feature_dim: int | None
    bootstrap: Bootstrap
    load_features: Callable[[], np.ndarray]  # their feature vectors, read when a metric asks
    weights: np.ndarray | None = None  # per image, how often a replicate drew it; None: once
    # their CLIP image embeddings (Need.EMBEDDINGS), read when a metric asks
    load_clip_embeddings: Callable[[], np.ndarray] | None = None
    # What a metric computes once per configuration and reuses in every replicate (CMMD's kernel
    # matrix): resampled groups share it (`per_configuration`).
    derived: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def features(self) -> np.ndarray:
        return self.load_features()

    @cached_property
    def clip_embeddings(self) -> np.ndarray:
        return self.load_clip_embeddings()

    @cached_property
    def stats(self) -> FeatureStats | None:
        """Their features' statistics, each image counted as `weights` says."""
        if self.weights is None or self.merged is None:
            return self.merged
        return FeatureStats.of(self.features, self.weights)

    @cached_property
    def frechet_resamples(self) -> FrechetResamples:
        """Their features projected once for FID under any weights (`FrechetResamples`)."""
        return FrechetResamples(self.features, self.frechet)

    def resampled(self, weights: np.ndarray) -> ConfigGroup:
        """The same images as a bootstrap replicate drew them (weights: per image, how often)."""
        if len(weights) != len(self.images):
            raise ValueError(f"{len(weights)} weights for {len(self.images)} images")
        return dataclasses.replace(
            self,
            weights=weights,
            load_features=lambda: self.features,
            load_clip_embeddings=lambda: self.clip_embeddings,
        )

    def per_configuration(self, key: str, compute: Callable[[], Any]) -> Any:
        """compute(), once per configuration: every bootstrap replicate of it reuses the result."""
        if key not in self.derived:
            self.derived[key] = compute()
        return self.derived[key]

    def per_reference(self, key: str, compute: Callable[[], Any]) -> Any:
        """compute(), once per reference: every configuration measured against it reuses the
        result."""
        kept = self.reference.derived
        if key not in kept:
            kept[key] = compute()
        return kept[key]

    def mean(self, column: str, name: str | None = None) -> dict[str, float]:
        """The mean of a per-image column over the images (rows with NaN, which a metric could
        not score, left out), as `name`."""
        return {name or column: weighted_mean(self.images[column].to_numpy(), self.weights)}


QUALITY = "image quality"  # closeness to real images (the reference set)
ALIGNMENT = "prompt alignment"  # agreement of each image with its prompt
PRESERVATION = "source preservation"  # image-conditioned runs: what an image keeps of its source


@dataclass(frozen=True)
class Metric:
    """One metric, declared once; see the module docstring."""

    name: str  # as suites list it
    label: str
    higher_is_better: bool
    judges: str  # QUALITY, ALIGNMENT or PRESERVATION; the report recommends by the first two
    needs: frozenset[Need]
    interval: Interval
    # One configuration's images -> its columns in configs.parquet, without intervals: those
    # come from calling it on bootstrap replicates (`aggregate_with_intervals`). The second
    # argument is the suite section named by `settings` (None without one).
    aggregate: Callable[[ConfigGroup, Any], dict[str, Any]]
    scores: tuple[Score, ...]  # the columns the report's table shows
    # All bootstrap replicates at once, where that is faster than `aggregate` on each resampled
    # group: (group, settings, weights (replicates, images)) -> per score column with an
    # interval, its replicates, the numbers `aggregate` would give. None: `aggregate` each.
    replicates: Callable[[ConfigGroup, Any, np.ndarray], dict[str, np.ndarray]] | None = None
    # Per-image columns a worker writes into each shard (and images.parquet), and how.
    image_columns: tuple[str, ...] = ()
    score_images: Callable[[UnitImages], dict[str, np.ndarray]] | None = None
    # Names this metric's per-image columns in the shard folder's key. None: they follow from the
    # models already in the key, so a worker computes them whenever those models are loaded.
    shard_token: str | None = None
    settings: str | None = None  # the suite section `aggregate` reads, e.g. "kid"
    # The report names the best configuration by this metric's headline score and plots it
    # against guidance and steps.
    ranked: bool = False
    # The least value its scores can take (FID: 0). A normal interval can reach below it; its
    # bound is raised to it, which loses no coverage since the true value is never lower.
    least: float | None = None
    most: float | None = None  # the greatest (a share's: 1), likewise for the upper bound
    # What a reader must know about its numbers in the whole table (configs.parquet), said once
    # as a warning after the table is computed: the table -> the warning, or None.
    caveat: Callable[[Any], str | None] | None = None

    def bounds(
        self, estimate: float, replicates: np.ndarray, confidence: float
    ) -> tuple[float, float]:
        """The interval of one of its scores (not of a difference) from its replicates."""
        low, high = self.interval.bounds(estimate, replicates, confidence)
        if self.least is not None and low < self.least:
            low = self.least
        if self.most is not None and high > self.most:
            high = self.most
        return low, high

    @property
    def headline(self) -> Score:
        """The score the report ranks, plots and compares configurations by: its first."""
        return self.scores[0]


def aggregate_with_intervals(
    metric: Metric, group: ConfigGroup, settings: Any, weights: np.ndarray
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A configuration's columns with `<column>_low` and `<column>_high` after each score that has
    an interval, and those scores' bootstrap replicates.

    Args:
        weights: (replicates, images): how often each replicate drew each image of the group.

    Returns:
        The row, and per score column its replicates (a NaN where a replicate drew no image
        the metric could score).
    """
    estimate = metric.aggregate(group, settings)
    columns = [s.column for s in metric.scores if s.interval]
    replicates: dict[str, np.ndarray] = {}
    if columns and metric.replicates is not None:
        replicates = metric.replicates(group, settings, weights)
    elif columns:
        replicates = {c: np.full(len(weights), math.nan) for c in columns}
        for r, drawn in enumerate(weights):
            resampled = metric.aggregate(group.resampled(drawn), settings)
            for c in columns:
                replicates[c][r] = resampled[c]
    row: dict[str, Any] = {}
    for name, value in estimate.items():
        row[name] = value
        if name in replicates:
            bounds = metric.bounds(value, replicates[name], group.bootstrap.confidence)
            row[f"{name}_low"], row[f"{name}_high"] = bounds
    return row, replicates
