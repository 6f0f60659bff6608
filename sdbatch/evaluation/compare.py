"""Configurations compared in pairs, and the sweep's main effects, from bootstrap replicates.

Replicate r of every configuration is computed on the same draw of prompts (evaluation.metric),
so a difference's replicates are the differences of the two configurations' replicates: the
paired bootstrap (Efron & Tibshirani 1993, ch. 9 and 16). What the prompts add to both cancels,
and the interval of a difference is narrower than two intervals side by side suggest. Two runs
pair the same way when their `bootstrap_draws` (metrics.json) are equal.

Many comparisons: the best configuration is compared with each of the N - 1 others at the
level 1 - alpha / (N - 1) (Bonferroni), so that all N - 1 intervals hold together at 1 - alpha;
a main effect's levels against its first level likewise, per axis.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from sdbatch.evaluation.metric import Bootstrap, Interval, Metric
from sdbatch.evaluation.registry import REGISTRY, ranked_metrics
from sdbatch.evaluation.table import CONFIG_COLUMNS

# What the sweep varies: the axes a main effect is computed for.
AXES = CONFIG_COLUMNS[1:]


@dataclass(frozen=True)
class Difference:
    """Configuration b minus configuration a in one column, with its paired interval."""

    column: str
    a: str
    b: str
    difference: float
    low: float
    high: float
    confidence: float


def draws_identity(prompt_ids: list[str], bootstrap: Bootstrap) -> str:
    """The identity of a run's bootstrap draws: equal for two runs whose replicates pair."""
    text = "\n".join([*sorted(set(prompt_ids)), f"{bootstrap.samples} {bootstrap.seed}"])
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def metric_of(column: str) -> Metric:
    """The metric whose scores include this configs.parquet column with an interval."""
    for metric in REGISTRY.values():
        if any(s.column == column and s.interval for s in metric.scores):
            return metric
    raise ValueError(f"{column}: no metric gives this column an interval")


def paired_difference(
    estimate_a: float,
    replicates_a: np.ndarray,
    estimate_b: float,
    replicates_b: np.ndarray,
    method: Interval,
    confidence: float,
) -> tuple[float, float, float]:
    """b - a and its interval, from replicates drawn on the same prompts (in the same order)."""
    if len(replicates_a) != len(replicates_b):
        raise ValueError(f"{len(replicates_a)} and {len(replicates_b)} replicates do not pair")
    difference = estimate_b - estimate_a
    low, high = method.bounds(
        difference, np.asarray(replicates_b) - np.asarray(replicates_a), confidence
    )
    return difference, low, high


def compare(
    configs: pd.DataFrame,
    replicates: pd.DataFrame,
    a: str,
    b: str,
    column: str,
    confidence: float,
) -> Difference:
    """Configuration b minus configuration a in `column` (configs.parquet, replicates.parquet
    of one run), with its paired interval at `confidence`."""
    estimates = _estimates(configs, column)
    drawn = replicates_by_config(replicates, column, configs)
    for config_id in (a, b):
        if config_id not in estimates.index:
            raise ValueError(f"{config_id}: not a configuration of this run")
    values = paired_difference(
        estimates[a], drawn[a], estimates[b], drawn[b], metric_of(column).interval, confidence
    )
    return Difference(column, a, b, *values, confidence)


def best_versus_others(
    configs: pd.DataFrame, replicates: pd.DataFrame, confidence: float
) -> pd.DataFrame:
    """For each ranked metric's headline: the best configuration against every other one, the
    intervals Bonferroni-adjusted to hold together at `confidence` (differences.parquet).

    `difference` is other - best; `worse` says its interval lies wholly on the worse side.
    """
    rows = []
    for metric in ranked_metrics():
        column = metric.headline.column
        if column not in configs or column not in replicates:
            continue
        estimates = _estimates(configs, column).dropna()
        if len(estimates) < 2:
            continue
        best = estimates.idxmax() if metric.higher_is_better else estimates.idxmin()
        comparisons = len(estimates) - 1
        level = 1 - (1 - confidence) / comparisons
        drawn = replicates_by_config(replicates, column, configs)
        for other in estimates.index.drop(best):
            difference, low, high = paired_difference(
                estimates[best], drawn[best], estimates[other], drawn[other],
                metric.interval, level,
            )  # fmt: skip
            rows.append({
                "metric": metric.name, "column": column,
                "higher_is_better": metric.higher_is_better,
                "best": best, "other": other,
                "best_value": estimates[best], "other_value": estimates[other],
                "difference": difference, "low": low, "high": high,
                "worse": bool(high < 0 if metric.higher_is_better else low > 0),
                "confidence": level, "family_confidence": confidence, "comparisons": comparisons,
            })  # fmt: skip
    return pd.DataFrame(rows, columns=DIFFERENCE_COLUMNS)


DIFFERENCE_COLUMNS = (
    "metric", "column", "higher_is_better", "best", "other", "best_value", "other_value",
    "difference", "low", "high", "worse", "confidence", "family_confidence", "comparisons",
)  # fmt: skip


def main_effects(
    configs: pd.DataFrame, replicates: pd.DataFrame, confidence: float
) -> pd.DataFrame:
    """Per sweep axis with two levels or more, and per column with an interval: each level's
    mean over the configurations at that level (averaged over the other axes), and its
    difference from the axis's first level, with intervals from the same replicates
    (effects.parquet). The differences of an axis hold together at `confidence` (Bonferroni).
    """
    columns = [c for c in replicates.columns if c not in ("config_id", "replicate")]
    rows = []
    for axis in AXES:
        levels = list(dict.fromkeys(configs[axis]))
        if len(levels) < 2:
            continue
        level_confidence = 1 - (1 - confidence) / (len(levels) - 1)
        for column in columns:
            metric = metric_of(column)
            estimates = _estimates(configs, column)
            drawn = replicates_by_config(replicates, column, configs)
            means, drawn_means = {}, {}
            for level in levels:
                ids = configs.loc[configs[axis] == level, "config_id"]
                means[level] = float(estimates[ids].mean())
                drawn_means[level] = drawn[ids].to_numpy().mean(axis=1)
            baseline = levels[0]
            for level in levels:
                low, high = metric.bounds(means[level], drawn_means[level], confidence)
                difference = low_d = high_d = np.nan
                if level != baseline:
                    difference, low_d, high_d = paired_difference(
                        means[baseline], drawn_means[baseline], means[level], drawn_means[level],
                        metric.interval, level_confidence,
                    )  # fmt: skip
                rows.append({
                    "axis": axis, "level": str(level), "column": column,
                    "mean": means[level], "low": low, "high": high,
                    "baseline": str(baseline), "difference": difference,
                    "difference_low": low_d, "difference_high": high_d,
                    "confidence": confidence, "difference_confidence": level_confidence,
                    "configs": int((configs[axis] == level).sum()),
                })  # fmt: skip
    return pd.DataFrame(rows, columns=EFFECT_COLUMNS)


EFFECT_COLUMNS = (
    "axis", "level", "column", "mean", "low", "high", "baseline", "difference",
    "difference_low", "difference_high", "confidence", "difference_confidence", "configs",
)  # fmt: skip


def _estimates(configs: pd.DataFrame, column: str) -> pd.Series:
    return configs.set_index("config_id")[column].astype(float)


def replicates_by_config(
    replicates: pd.DataFrame, column: str, configs: pd.DataFrame
) -> pd.DataFrame:
    """(replicate, config_id) -> value: one column of replicates per configuration (empty when
    the suite has no bootstrap samples)."""
    wide = replicates.pivot(index="replicate", columns="config_id", values=column)
    return wide.reindex(columns=configs["config_id"])
