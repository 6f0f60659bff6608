"""What a metric is: one declaration that evaluation and the report both read.

A `Metric` says, once: its name in suites and its label; whether higher is better; what it needs
(CLIP, the extractor's features, a reference, the world judge); the per-image columns it writes
into shards and images.parquet, and how a worker scores them; how one configuration aggregates
into numbers on the driver, and how their interval is computed; and the columns and plots the
report shows. `sdbatch.evaluation.registry` lists them.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd

from sdbatch.evaluation.clip import ClipEncoder
from sdbatch.evaluation.metric_math import FeatureStats, FrechetReference, mean_interval
from sdbatch.evaluation.reference import ReferenceStats
from sdbatch.spec import MAX_SEED
from sdbatch.typed_data import conform, require, within


class Need(enum.Enum):
    """What a metric is computed from; evaluation loads only what the suite's metrics need."""

    CLIP = "the suite's CLIP model (image and text embeddings)"
    FEATURES = "the feature extractor's features (fid.features)"
    REFERENCE = "statistics of real images (reference)"
    JUDGE = "the shapes world's pixel judge (no model)"


class Interval(enum.Enum):
    """How a metric's confidence interval is computed, in words (metrics.json and the report)."""

    PERCENTILE = "percentile bootstrap over images"
    NORMAL = (
        "estimate +- z * SE, SE the standard deviation of bootstrap replicates over images "
        "(the reference held fixed)"
    )
    NONE = "none; the spread over random subsets is given instead"


# Intervals settle within a few hundred resamples; each one recomputes every metric.
MAX_BOOTSTRAP = 10_000


@dataclass(frozen=True)
class Bootstrap:
    """Bootstrap confidence intervals over images (a suite's `bootstrap:`)."""

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


@dataclass
class ConfigGroup:
    """What a metric aggregates on the driver: the images of one configuration that count (those
    the safety checker flagged are left out under `safety: exclude`)."""

    config_id: str
    images: pd.DataFrame  # their per-image columns
    stats: FeatureStats | None  # their features' merged statistics (None: no extractor)
    reference: ReferenceStats | None
    frechet: FrechetReference | None  # the reference's Gaussian, its square root computed once
    feature_dim: int | None
    bootstrap: Bootstrap
    load_features: Callable[[], np.ndarray]  # their feature vectors, read when a metric asks

    @cached_property
    def features(self) -> np.ndarray:
        return self.load_features()

    def mean(self, column: str, name: str | None = None) -> dict[str, float]:
        """The mean of a per-image column over the images (rows with NaN, which a metric could
        not score, left out) and its percentile bootstrap interval, as `name`, `name_low` and
        `name_high`."""
        name = name or column
        values = self.images[column].dropna().to_numpy(dtype=np.float64)
        b = self.bootstrap
        low, high = mean_interval(values, b.samples, b.confidence, b.seed)
        mean = float(values.mean()) if len(values) else math.nan
        return {name: mean, f"{name}_low": low, f"{name}_high": high}


@dataclass(frozen=True)
class Metric:
    """One metric, declared once; see the module docstring."""

    name: str  # as suites list it
    label: str
    higher_is_better: bool
    needs: frozenset[Need]
    interval: Interval
    # One configuration's images -> its columns in configs.parquet. The second argument is the
    # suite section named by `settings` (None without one).
    aggregate: Callable[[ConfigGroup, Any], dict[str, Any]]
    scores: tuple[Score, ...]  # the columns the report's table shows
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

    @property
    def headline(self) -> Score:
        """The score the report ranks, plots and compares configurations by: its first."""
        return self.scores[0]
