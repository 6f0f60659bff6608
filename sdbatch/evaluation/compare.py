"""Configurations compared in pairs, and the sweep's main effects, from bootstrap replicates.

Replicate r of every configuration is computed on the same draw of prompts (evaluation.metric),
so a difference's replicates are the differences of the two configurations' replicates: the
paired bootstrap (Efron & Tibshirani 1993, ch. 9 and 16). What the prompts add to both cancels,
and the interval of a difference is narrower than two intervals side by side suggest. Two runs
pair the same way when their `bootstrap_draws` (metrics.json) are equal.

Many comparisons: the best configuration is compared with each of the N - 1 others at the
level 1 - alpha / (N - 1) (Bonferroni), so that all N - 1 intervals hold together at 1 - alpha;
a main effect's levels against its first level likewise, per axis, and each model or adapter
against the baseline model.

A model or adapter is compared with the baseline at the configurations both have (the same
scheduler, steps and guidance, so the same prompts and seeds): the mean over those
configurations of the paired differences.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from sdbatch.evaluation.metric import Bootstrap, Interval, Metric
from sdbatch.evaluation.registry import REGISTRY, ranked_metrics
from sdbatch.evaluation.table import CONFIG_COLUMNS

# What a configuration samples from: a model, its adapter (null: none) and the adapter's scale.
# Outputs evaluated before sdbatch swept models have none of these columns.
MODEL_AXES = ("model", "lora", "lora_scale")
# What the sweep varies: the axes a main effect is computed for, models and adapters first.
AXES = CONFIG_COLUMNS[1:]
# How a main effect's level, a plot and a sentence name "no adapter" (a null lora and scale).
NO_ADAPTER = "none"


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
    for axis in (a for a in AXES if a in configs):
        values = axis_values(configs, axis)
        levels = list(dict.fromkeys(values))
        if len(levels) < 2:
            continue
        level_confidence = 1 - (1 - confidence) / (len(levels) - 1)
        for column in columns:
            metric = metric_of(column)
            estimates = _estimates(configs, column)
            drawn = replicates_by_config(replicates, column, configs)
            pooled = {
                level: _pooled(estimates, drawn, configs.loc[values == level, "config_id"])
                for level in levels
            }
            baseline = levels[0]
            for level in levels:
                mean, drawn_mean = pooled[level]
                low, high = metric.bounds(mean, drawn_mean, confidence)
                difference = low_d = high_d = np.nan
                if level != baseline:
                    difference, low_d, high_d = paired_difference(
                        *pooled[baseline], *pooled[level], metric.interval, level_confidence
                    )
                rows.append({
                    "axis": axis, "level": str(level), "column": column,
                    "mean": mean, "low": low, "high": high,
                    "baseline": str(baseline), "difference": difference,
                    "difference_low": low_d, "difference_high": high_d,
                    "confidence": confidence, "difference_confidence": level_confidence,
                    "configs": int((values == level).sum()),
                })  # fmt: skip
    return pd.DataFrame(rows, columns=EFFECT_COLUMNS)


EFFECT_COLUMNS = (
    "axis", "level", "column", "mean", "low", "high", "baseline", "difference",
    "difference_low", "difference_high", "confidence", "difference_confidence", "configs",
)  # fmt: skip


def axis_values(configs: pd.DataFrame, axis: str) -> pd.Series:
    """A sweep axis's value per configuration, "none" where a configuration has no adapter."""
    return configs[axis].astype(object).where(configs[axis].notna(), NO_ADAPTER)


def model_names(configs: pd.DataFrame) -> pd.Series:
    """Each configuration's model and adapter in words: `builtin:toy`, or with an adapter at
    its scale `builtin:toy + builtin:toy-purple at 0.5`."""
    return pd.Series(
        [
            model_name(model, lora, scale)
            for model, lora, scale in configs[list(MODEL_AXES)].itertuples(index=False)
        ],
        index=configs.index,
    )


def model_name(model: str, lora: str | None, scale: float | None) -> str:
    """A model with its adapter at its scale, in words (see model_names)."""
    if lora is None or pd.isna(lora):
        return model
    # words rather than a multiplication sign, which the image grids' font lacks
    return f"{model} + {lora} at {scale:g}"


def versus_baseline(
    configs: pd.DataFrame, replicates: pd.DataFrame, baseline: str, confidence: float
) -> pd.DataFrame:
    """For each ranked metric's headline and each model or adapter other than `baseline` (a
    model_name): its mean minus the baseline's over the configurations both have (the same
    scheduler, steps and guidance), with the paired interval; the intervals of a metric hold
    together at `confidence` over the models and adapters compared (Bonferroni).

    `better` and `worse` say that the interval lies wholly on that side of zero; `configs` is
    the number of configurations compared (0: none in common with the baseline).
    """
    names = model_names(configs)
    sampling = [a for a in AXES if a not in MODEL_AXES and a in configs]
    at = configs.assign(_name=names).set_index(sampling)
    base = at.loc[at["_name"] == baseline, "config_id"]
    others = [n for n in dict.fromkeys(names) if n != baseline]
    level = 1 - (1 - confidence) / max(len(others), 1)
    rows = []
    for metric in ranked_metrics():
        column = metric.headline.column
        if column not in configs or column not in replicates:
            continue
        estimates = _estimates(configs, column)
        drawn = replicates_by_config(replicates, column, configs)
        for name in others:
            mine = at.loc[at["_name"] == name, "config_id"]
            mine = mine[mine.index.isin(base.index)]
            matched = base[mine.index]
            difference = low = high = value = base_value = np.nan
            if len(mine):
                (value, drawn_value), (base_value, drawn_base) = (
                    _pooled(estimates, drawn, ids) for ids in (mine, matched)
                )
                difference, low, high = paired_difference(
                    base_value, drawn_base, value, drawn_value, metric.interval, level
                )
            up, down = bool(low > 0), bool(high < 0)
            rows.append({
                "model": name, "baseline": baseline, "metric": metric.name, "column": column,
                "higher_is_better": metric.higher_is_better, "configs": len(mine),
                "value": value, "baseline_value": base_value,
                "difference": difference, "low": low, "high": high,
                "better": up if metric.higher_is_better else down,
                "worse": down if metric.higher_is_better else up,
                "confidence": level, "family_confidence": confidence,
                "comparisons": len(others),
            })  # fmt: skip
    return pd.DataFrame(rows, columns=VERSUS_COLUMNS)


VERSUS_COLUMNS = (
    "model", "baseline", "metric", "column", "higher_is_better", "configs", "value",
    "baseline_value", "difference", "low", "high", "better", "worse", "confidence",
    "family_confidence", "comparisons",
)  # fmt: skip


def group_means(
    configs: pd.DataFrame,
    replicates: pd.DataFrame,
    column: str,
    keys: pd.Series,
    confidence: float,
) -> pd.DataFrame:
    """Per value of `keys` (one per configuration): the mean of `column` over its
    configurations and the interval of that mean from the same replicates, as `mean`, `low`,
    `high` and `configs`, indexed by the key."""
    metric = metric_of(column)
    estimates = _estimates(configs, column)
    drawn = replicates_by_config(replicates, column, configs)
    rows = {}
    for key in dict.fromkeys(keys):
        ids = configs.loc[keys == key, "config_id"]
        mean, drawn_mean = _pooled(estimates, drawn, ids)
        low, high = metric.bounds(mean, drawn_mean, confidence)
        rows[key] = {"mean": mean, "low": low, "high": high, "configs": len(ids)}
    return pd.DataFrame.from_dict(rows, orient="index")


def _pooled(estimates: pd.Series, drawn: pd.DataFrame, ids: pd.Series) -> tuple[float, np.ndarray]:
    """The mean over configurations `ids`, and per replicate the mean of their replicates."""
    return float(estimates[ids].mean()), drawn[ids].to_numpy().mean(axis=1)


def _estimates(configs: pd.DataFrame, column: str) -> pd.Series:
    return configs.set_index("config_id")[column].astype(float)


def replicates_by_config(
    replicates: pd.DataFrame, column: str, configs: pd.DataFrame
) -> pd.DataFrame:
    """(replicate, config_id) -> value: one column of replicates per configuration (empty when
    the suite has no bootstrap samples)."""
    wide = replicates.pivot(index="replicate", columns="config_id", values=column)
    return wide.reindex(columns=configs["config_id"])
