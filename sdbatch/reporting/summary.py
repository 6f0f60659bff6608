"""The report's words and tables: which configuration is best by each ranked metric and by how much,
the trade-off's Pareto front, every configuration, two runs side by side, and provenance.

Every metric's label, direction and formatting come from its declaration in the registry.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sdbatch.evaluation.metric import Metric
from sdbatch.evaluation.registry import REGISTRY, TRADEOFF, ranked_metrics
from sdbatch.reporting.parts import Section
from sdbatch.reporting.runs import PARAMS, Run


def sections(runs: list[Run], missing: list[str]) -> list[Section]:
    """Summaries, the comparison of two runs, every configuration, and provenance."""
    parts = [_summary(run) for run in runs]
    if missing:
        parts[0].lines += missing
    if len(runs) == 2:
        parts.append(_comparison(*runs))
    for run in runs:
        parts.append(Section(f"All configurations: {run.name}", [], _every_configuration(run)))
    return parts + [_provenance(run) for run in runs]


def pareto_front(configs: pd.DataFrame, objectives: tuple[Metric, ...] = TRADEOFF) -> pd.Series:
    """True for configurations no other one beats on every objective (each metric's headline score,
    in its direction): by default the FID-CLIP score trade-off."""
    signs = [1 if m.higher_is_better else -1 for m in objectives]
    values = np.column_stack(
        [s * configs[m.headline.column].to_numpy() for m, s in zip(objectives, signs, strict=True)]
    )
    dominated = [bool(np.any((values >= v).all(axis=1) & (values > v).any(axis=1))) for v in values]
    return pd.Series(~np.array(dominated), index=configs.index)


def label(row: pd.Series) -> str:
    steps, guidance = row["num_inference_steps"], row["guidance_scale"]
    return f"{row['scheduler']}, {steps} steps, guidance {guidance:g}"


SECONDS_HEADER = "s/image, median [IQR]"


def cost(row: pd.Series) -> str:
    """A configuration's cost in words: model evaluations per image, then measured time."""
    return f"{row['unet_evals_per_image']:.0f} UNet evaluations/image, {_seconds(row)}"


def _seconds(row: pd.Series, cell: bool = False) -> str:
    """Measured seconds per image in a sentence, or in a table cell under `SECONDS_HEADER`."""
    unit = "" if cell else " s/image"
    if "seconds_per_image_median" not in row:  # evaluated by sdbatch 0.1: one mean
        return f"{row['seconds_per_image']:.3f}{unit} (mean, warm-up included)"
    if pd.isna(row["seconds_per_image_median"]):
        return f"n/a{unit} (warm-up batches only)"
    q1, median, q3 = (row[f"seconds_per_image_{q}"] for q in ("q1", "median", "q3"))
    spread = f"[{q1:.3f}, {q3:.3f}]" if cell else f"(median; IQR {q1:.3f}-{q3:.3f})"
    return f"{median:.3f}{unit} {spread}"


def _best(ranked: pd.DataFrame, metric: Metric) -> pd.Series:
    column = ranked[metric.headline.column]
    return ranked.loc[column.idxmax() if metric.higher_is_better else column.idxmin()]


def _paired(run: Run, column: str, best: pd.Series, other: pd.Series) -> pd.Series | None:
    """The paired difference other - best from differences.parquet, when the run has it."""
    if run.differences is None:
        return None
    d = run.differences
    match = d[(d["column"] == column) & (d["best"] == best["config_id"])]
    match = match[match["other"] == other["config_id"]]
    return match.iloc[0] if len(match) else None


def _overlap(a: pd.Series, b: pd.Series, column: str) -> bool | None:
    low, high = f"{column}_low", f"{column}_high"
    if any(pd.isna(x.get(k)) for x in (a, b) for k in (low, high)):
        return None
    return bool(a[low] <= b[high] and b[low] <= a[high])


def _summary(run: Run) -> Section:
    configs = run.configs
    lines = []
    for metric in ranked_metrics():
        if not run.has_metric(metric):
            continue
        score = metric.headline
        ranked = configs.dropna(subset=[score.column])
        best = _best(ranked, metric)
        line = (
            f"Best by {metric.label}: **{label(best)}** (`{best['config_id']}`), "
            f"{score.cell(best)}, {cost(best)}."
        )
        others = ranked.drop(index=best.name)
        if len(others):
            second = _best(others, metric)
            paired = _paired(run, score.column, best, second)
            overlap = _overlap(best, second, score.column)
            if paired is not None:
                verdict = "clearly better" if paired["worse"] else "not clearly better"
                line += (
                    f" Runner-up {label(second)}: {score.cell(second)}; paired difference "
                    f"{paired['difference']:+.3g} [{paired['low']:+.3g}, {paired['high']:+.3g}] "
                    f"({paired['family_confidence']:.0%} together over {paired['comparisons']} "
                    f"comparisons with the best): {verdict}."
                )
            elif overlap is not None:
                verdict = "overlap: not clearly better" if overlap else "do not overlap"
                line += (
                    f" Runner-up {label(second)}: {score.cell(second)}; the intervals {verdict}."
                )
        lines.append(line)
    metrics = run.metrics
    if metrics.flagged_images:
        policy = metrics.suite.safety
        where = {"exclude": "excluded from", "include": "included in"}[policy]
        lines.append(
            f"The model's safety checker flagged {metrics.flagged_images} of {metrics.images} "
            f"images (it makes them black); they are **{where}** every metric "
            f"(suite `safety: {policy}`)."
        )
    if all(run.has_metric(m) for m in TRADEOFF) and len(configs) > 1:
        x, y = TRADEOFF
        front = configs[pareto_front(configs)].sort_values(
            y.headline.column, ascending=not y.higher_is_better
        )
        picks = "; ".join(
            f"{label(r)} ({y.label} {r[y.headline.column]:.2f}, "
            f"{x.label} {r[x.headline.column]:.2f}, {cost(r)})"
            for _, r in front.iterrows()
        )
        lines.append(
            f"{y.label}-{x.label} trade-off (Pareto front, no configuration beats these on "
            f"both): {picks}."
        )
    return Section(f"Summary: {run.name}", lines)


def _every_configuration(run: Run) -> pd.DataFrame:
    table = pd.DataFrame(
        {
            "configuration": run.configs["config_id"],
            "scheduler": run.configs["scheduler"],
            "steps": run.configs["num_inference_steps"],
            "guidance": run.configs["guidance_scale"].map("{:g}".format),
            "images": run.configs["n_images"],
            "UNet evals/image": run.configs["unet_evals_per_image"].map("{:.0f}".format),
            SECONDS_HEADER: [_seconds(r, cell=True) for _, r in run.configs.iterrows()],
        }
    )
    if run.has("n_flagged"):  # the model has a safety checker
        policy = run.metrics.suite.safety
        counts = run.configs["n_flagged"].map(lambda n: "n/a" if pd.isna(n) else f"{n:.0f}")
        table.insert(5, f"flagged ({policy}d)", counts)
    for metric in REGISTRY.values():
        for score in metric.scores:
            if run.has(score.column):
                table[score.header] = [score.cell(r) for _, r in run.configs.iterrows()]
    return table


def _comparison(a: Run, b: Run) -> Section:
    joined = a.configs.merge(b.configs, on=PARAMS, suffixes=("_a", "_b"))
    rows = []
    for _, r in joined.iterrows():
        row = {"configuration": label(r)}
        for metric in ranked_metrics():
            if not (a.has_metric(metric) and b.has_metric(metric)):
                continue
            score, name = metric.headline, metric.label
            ra, rb = _side(r, "_a"), _side(r, "_b")
            row[f"{name} {a.name}"] = score.cell(ra)
            row[f"{name} {b.name}"] = score.cell(rb)
            row[f"{name} diff"] = f"{rb[score.column] - ra[score.column]:+.{score.digits}f}"
            overlap = _overlap(ra, rb, score.column)
            row[f"{name} intervals"] = {None: "n/a", True: "overlap", False: "differ"}[overlap]
        rows.append(row)
    lines = [
        f"Differences are {b.name} minus {a.name}, over the {len(joined)} configurations both "
        "runs have; `differ` means the confidence intervals do not overlap."
    ]
    return Section(f"Comparison: {a.name} vs {b.name}", lines, pd.DataFrame(rows))


def _side(row: pd.Series, suffix: str) -> pd.Series:
    """One run's half of a joined row, under the plain column names."""
    return pd.Series(
        {
            k.removesuffix(suffix): v
            for k, v in row.items()
            if not k.endswith(("_a", "_b")) or k.endswith(suffix)
        }
    )


def _provenance(run: Run) -> Section:
    m, r = run.metrics, run.record
    clip = m.clip
    lines = [
        f"Output `{run.out.location}`; model `{r.model.ref}` ({r.model.identity}), "
        f"dtype {r.dtype or 'n/a'}, seed {r.spec.seed}, "
        f"{r.prompts.count} prompts (sha256 {r.prompts.sha256[:16]}).",
        f"CLIP `{clip.ref if clip else 'n/a'}` ({clip.identity if clip else 'n/a'}); "
        f"{m.truncated_prompts} prompts longer than CLIP's context were truncated "
        "(keeping end-of-text).",
    ]
    if m.extractor:
        e = m.extractor
        lines.append(
            f"FID features: `{e.name}`, {e.dim}-d, weights {e.weights}, resize `{e.resize}`."
        )
    if m.reference:
        lines.append(
            f"Reference: `{m.reference.source}`, {m.reference.count} images, statistics "
            f"{m.reference.sha256}."
        )
    if m.intervals:
        b = m.suite.bootstrap
        methods = "; ".join(
            f"{REGISTRY[name].label if name in REGISTRY else name}: {method}"
            for name, method in m.intervals.items()
        )
        lines.append(
            f"Intervals ({b.confidence:.0%}, {b.samples} bootstrap resamples, seed {b.seed}): "
            f"{methods}."
        )
    if run.has("devices"):
        devices = sorted({d for ds in run.configs["devices"] for d in ds.split(", ")})
        lines.append(
            f"Times measured on {', '.join(devices)}: median and quartiles over each "
            "configuration's batches, leaving out warm-up (a worker's first batch at each shape)."
        )
    versions = ", ".join(f"{k} {v}" for k, v in sorted(m.versions.items()))
    lines.append(f"Versions: {versions}. Evaluated {m.finished}.")
    return Section(f"Provenance: {run.name}", lines)
