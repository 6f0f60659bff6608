"""The report's words and tables: a recommendation (the configuration to use for image quality, for
prompt alignment, and the cheapest one not clearly worse than the best), each model or adapter
against the baseline when a run has several, which configuration is best by each metric and by
how much, the sweep's main effects, the trade-off's Pareto front, every configuration, two runs
side by side, and provenance.

"Clearly worse" is decided by the paired differences of differences.parquet (the same prompts
resampled for both configurations, the intervals holding together over the comparisons with the
best); outputs evaluated before sdbatch paired its statistics fall back to overlapping intervals.
Every metric's label, direction and formatting come from its declaration in the registry.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sdbatch.evaluation.compare import (
    NO_ADAPTER,
    paired_difference,
    replicates_by_config,
    versus_baseline,
)
from sdbatch.evaluation.metric import ALIGNMENT, QUALITY, Metric
from sdbatch.evaluation.registry import REGISTRY, TRADEOFF, ranked_metrics
from sdbatch.reporting.parts import Section
from sdbatch.reporting.runs import MODEL, PARAMS, TASK_PARAMS, Run


def sections(runs: list[Run], missing: list[str]) -> list[Section]:
    """Recommendations, summaries and main effects, the comparison of two runs, every
    configuration, and provenance."""
    parts = []
    for run in runs:
        summary = _summary(run)
        if run is runs[0]:
            summary.lines += missing
        parts.append(recommendation(run))
        if run.baseline is not None:
            parts.append(models_and_adapters(run))
        parts.append(summary)
        if run.effects is not None and len(run.effects):
            parts.append(_main_effects(run))
    if len(runs) == 2:
        parts.append(_comparison(*runs))
    for run in runs:
        table = _every_configuration(run)
        parts.append(Section(f"All configurations: {run.name}", [], table, appendix=True))
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
    """A configuration in words, its model and adapter first when the run has several."""
    steps, guidance = row["num_inference_steps"], row["guidance_scale"]
    model = f"{row[MODEL]}, " if MODEL in row else ""
    text = f"{model}{row['scheduler']}, {steps} steps, guidance {guidance:g}"
    if pd.notna(row.get("strength")):
        text += f", strength {row['strength']:g}"
    if pd.notna(row.get("outpaint")):
        text += f", outpaint {row['outpaint']}"
    return text


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


def best_by(ranked: pd.DataFrame, metric: Metric) -> pd.Series:
    """The configuration with the best headline score of `metric` (rows without one dropped)."""
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


def _not_worse(run: Run, metric: Metric) -> tuple[pd.Series, set[str]]:
    """The best configuration by `metric`, and the configurations not clearly worse than it (the
    best among them): by the paired differences, else by overlapping intervals."""
    column = metric.headline.column
    ranked = run.configs.dropna(subset=[column])
    best = best_by(ranked, metric)
    d = run.differences
    if d is not None and (d["column"] == column).any():
        mine = d[(d["column"] == column) & (d["best"] == best["config_id"])]
        return best, {best["config_id"], *mine.loc[~mine["worse"], "other"]}
    near = {r["config_id"] for _, r in ranked.iterrows() if _overlap(best, r, column)}
    return best, near | {best["config_id"]}


def recommendation(run: Run) -> Section:
    """One sentence each: what to use for image quality, for prompt alignment, and the cheapest
    configuration not clearly worse than the best by any ranked metric."""
    metrics = [m for m in ranked_metrics() if run.has_metric(m)]
    if len(run.configs) < 2 or not metrics:
        only = "A single configuration: nothing to choose."
        return Section(f"Recommendation: {run.name}", [only])
    judged = {m.name: _not_worse(run, m) for m in metrics}
    lines = []
    for kind in (QUALITY, ALIGNMENT):
        mine = [m for m in metrics if m.judges == kind]
        if not mine:
            continue
        bests = {judged[m.name][0]["config_id"] for m in mine}
        by = ", ".join(f"{m.label} {m.headline.cell(judged[m.name][0])}" for m in mine)
        if len(bests) == 1:
            best = judged[mine[0].name][0]
            tied = set.intersection(*(judged[m.name][1] for m in mine)) - bests
            undecided = len(tied) == len(run.configs) - 1
            lines.append(
                f"For {kind}: **{label(best)}** (best by {by}); "
                f"{_count(len(tied), 'other configuration')} not clearly worse"
                + (" (this many prompts cannot tell them apart)." if undecided else ".")
            )
        else:
            picks = "; ".join(f"by {m.label}, **{label(judged[m.name][0])}**" for m in mine)
            lines.append(f"For {kind} the metrics disagree: {picks} ({by}).")
    candidates = set.intersection(*(near for _, near in judged.values()))
    names = ", ".join(m.label for m in metrics)
    if candidates:
        pick = _cheapest(run, candidates, metrics[0])
        dearest = max(metrics, key=lambda m: judged[m.name][0]["unet_evals_per_image"])
        priciest = judged[dearest.name][0]
        ratio = priciest["unet_evals_per_image"] / pick["unet_evals_per_image"]
        saving = (
            f"; {ratio:.3g}x fewer model evaluations than the best by {dearest.label} "
            f"({label(priciest)})"
        ) * bool(ratio > 1)
        lines.append(
            f"Cheapest not clearly worse than the best by any of {names}: **{label(pick)}**, "
            f"{cost(pick)}{saving}."
        )
    else:
        picks = "; ".join(
            f"by {m.label}, {label(_cheapest(run, judged[m.name][1], m))}" for m in metrics
        )
        lines.append(
            f"No configuration is close to the best by all of {names}; the cheapest one not "
            f"clearly worse than the best {picks}."
        )
    lines.append(_judged_how(run, metrics))
    return Section(f"Recommendation: {run.name}", lines)


def _cheapest(run: Run, config_ids: set[str], metric: Metric) -> pd.Series:
    """The fewest model evaluations per image; among equals, the best by `metric`."""
    rows = run.configs[run.configs["config_id"].isin(config_ids)]
    sign = -1 if metric.higher_is_better else 1
    order = rows.assign(_key=sign * rows[metric.headline.column])
    return order.sort_values(["unet_evals_per_image", "_key"]).iloc[0]


def _judged_how(run: Run, metrics: list[Metric]) -> str:
    d = run.differences
    if d is None or d.empty:
        return (
            "Not clearly worse: the confidence intervals overlap (this output was evaluated "
            "before sdbatch paired its statistics; rerun `sdbatch eval` for paired intervals)."
        )
    first = d.iloc[0]
    return (
        f"Not clearly worse: the paired {first['family_confidence']:.0%} interval of the "
        "difference from the best (the same prompts resampled for both) reaches the best's "
        f"side; the {first['comparisons']} comparisons with the best hold together "
        f"(Bonferroni, each at {first['confidence']:.2%}). Cost is model evaluations (UNet "
        "calls) per image."
    )


def _count(n: int, noun: str) -> str:
    return f"{'no' if n == 0 else n} {noun}{'' if n == 1 else 's'} {'is' if n == 1 else 'are'}"


# The sweep's axes as the report names them (in sentences, tables and plots).
AXIS_NAMES = {
    "model": "model",
    "lora": "adapter",
    "lora_scale": "adapter scale",
    "task": "task",
    "strength": "strength",
    "outpaint": "outpaint expansion",
    "scheduler": "scheduler",
    "num_inference_steps": "steps",
    "guidance_scale": "guidance scale",
}


def _level(text: str) -> str:
    try:
        return f"{float(text):g}"
    except ValueError:
        return text


def _main_effects(run: Run) -> Section:
    """Each sweep axis's levels averaged over the other axes, and their paired differences from
    the axis's first level: a sentence per axis and a table."""
    effects = run.effects
    metrics = [m for m in ranked_metrics() if (effects["column"] == m.headline.column).any()]
    lines, rows = [], []
    for axis, of_axis in effects.groupby("axis", sort=False):
        name = AXIS_NAMES.get(axis, axis)
        changes, changed = [], set()
        for level, at_level in of_axis.groupby("level", sort=False):
            row = {"axis": name, "level": _level(level), "configs": at_level["configs"].iloc[0]}
            clear = []
            for metric in metrics:
                score = metric.headline
                r = at_level[at_level["column"] == score.column].iloc[0]
                bounds = {f"{score.column}_low": r["low"], f"{score.column}_high": r["high"]}
                row[metric.label] = score.cell({score.column: r["mean"], **bounds})
                if pd.isna(r["difference"]):
                    row[f"{metric.label}: difference"] = "(first level)"
                    continue
                shift = _ranged(
                    r["difference"], r["difference_low"], r["difference_high"], score.digits
                )
                row[f"{metric.label}: difference"] = shift
                if r["difference_low"] > 0 or r["difference_high"] < 0:
                    clear.append(f"{metric.label} {shift}")
                    changed.add(metric.label)
            rows.append(row)
            if clear:
                baseline = _level(at_level["baseline"].iloc[0])
                changes.append(f"{name} {baseline} → {_level(level)}: {', '.join(clear)}")
        flat = [m.label for m in metrics if m.label not in changed]
        if flat:
            changes.append(f"{name}: no clear difference in {', '.join(flat)}")
        lines.append("; ".join(changes) + ".")
    first = effects.iloc[0]
    lines.append(
        "Each level's mean over the configurations at that level, the other axes averaged out; "
        f"differences from the axis's first level with paired {first['confidence']:.0%} "
        "intervals that hold together per axis (Bonferroni)."
    )
    return Section(f"Main effects: {run.name}", lines, pd.DataFrame(rows))


def models_and_adapters(run: Run) -> Section:
    """Each model or adapter against the run's baseline, per ranked metric: clearly better,
    clearly worse or no clear difference, by the paired interval of the difference over the
    configurations both have: a sentence per model or adapter and a table."""
    title = f"Models and adapters: {run.name}"
    if run.replicates is None:
        return Section(title, ["No bootstrap replicates: rerun `sdbatch eval` to compare them."])
    confidence = run.metrics.suite.bootstrap.confidence
    versus = versus_baseline(run.configs, run.replicates, run.baseline, confidence)
    if versus.empty:
        return Section(title, ["No ranked metric has bootstrap replicates to compare them by."])
    metrics = [m for m in ranked_metrics() if (versus["metric"] == m.name).any()]
    lines, rows = [], []
    for name, of_model in versus.groupby("model", sort=False):
        if of_model["configs"].iloc[0] == 0:
            lines.append(
                f"**{name}**: no configuration in common with the baseline (the same scheduler, "
                "steps and guidance), so no paired comparison."
            )
            continue
        row = {"model / adapter": name, "configurations": of_model["configs"].iloc[0]}
        words = []
        for metric in metrics:
            v = of_model[of_model["metric"] == metric.name].iloc[0]
            digits = metric.headline.digits
            shift = _ranged(v["difference"], v["low"], v["high"], digits)
            verdict = _verdict(v)
            words.append(f"{metric.label} {verdict}, {shift}")
            row[metric.label] = f"{v['value']:.{digits}f}"
            row[f"{metric.label}: baseline"] = f"{v['baseline_value']:.{digits}f}"
            row[f"{metric.label}: difference"] = shift
            row[f"{metric.label}: verdict"] = verdict
        lines.append(f"**{name}** vs the baseline: {'; '.join(words)}.")
        rows.append(row)
    first = versus.iloc[0]
    lines.append(
        f"Baseline: **{run.baseline}** (the spec's `baseline:`; by default the first model "
        "without an adapter). Each difference is a model or adapter minus the baseline, "
        "averaged over the configurations both have (the same scheduler, steps and guidance, "
        f"so the same prompts and seeds), with a paired {confidence:.0%} interval; the "
        f"{first['comparisons']} comparisons with the baseline hold together per metric "
        f"(Bonferroni, each at {first['confidence']:.2%})."
    )
    return Section(title, lines, pd.DataFrame(rows) if rows else None)


def _verdict(difference: pd.Series) -> str:
    """A paired difference in words: whether its interval lies wholly on one side of zero."""
    if difference["better"]:
        return "clearly better"
    return "clearly worse" if difference["worse"] else "no clear difference"


def _ranged(value: float, low: float, high: float, digits: int) -> str:
    """A signed difference with its interval: +1.23 [+0.45, +2.01]."""
    return f"{_signed(value, digits)} [{_signed(low, digits)}, {_signed(high, digits)}]"


def _signed(value: float, digits: int) -> str:
    return f"{value:+.{digits}f}"


def _summary(run: Run) -> Section:
    configs = run.configs
    lines = []
    for metric in REGISTRY.values():
        if not run.has_metric(metric):
            continue
        score = metric.headline
        ranked = configs.dropna(subset=[score.column])
        best = best_by(ranked, metric)
        line = (
            f"Best by {metric.label}: **{label(best)}** (`{best['config_id']}`), "
            f"{score.cell(best)}, {cost(best)}."
        )
        others = ranked.drop(index=best.name)
        if len(others):
            second = best_by(others, metric)
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
    return Section(f"Best by each metric: {run.name}", lines)


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
    for column in ("outpaint", "strength"):  # an image-conditioned task's, after the guidance
        if run.has(column):
            values = run.configs[column]
            table.insert(4, column, values if column == "outpaint" else values.map("{:g}".format))
    if run.baseline is not None:
        scales = run.configs["lora_scale"].map(lambda s: NO_ADAPTER if pd.isna(s) else f"{s:g}")
        table.insert(1, "model", run.configs["model"])
        table.insert(2, "adapter", run.configs["lora"].fillna(NO_ADAPTER))
        table.insert(3, "adapter scale", scales)
    for metric in REGISTRY.values():
        for score in metric.scores:
            if run.has(score.column):
                table[score.header] = [score.cell(r) for _, r in run.configs.iterrows()]
    return table


def _comparison(a: Run, b: Run) -> Section:
    """Per configuration both runs have, B minus A in each ranked metric: paired when the two
    runs' bootstrap replicates drew the same prompts, else by whether the intervals overlap."""
    # the same model and adapter too, when both runs have several
    keys = [MODEL, *PARAMS] if a.baseline and b.baseline else PARAMS
    keys = [*keys, *(c for c in TASK_PARAMS if c in a.configs and c in b.configs)]
    joined = a.configs.merge(b.configs, on=keys, suffixes=("_a", "_b"))
    paired = (
        a.replicates is not None
        and b.replicates is not None
        and a.metrics.bootstrap_draws != ""
        and a.metrics.bootstrap_draws == b.metrics.bootstrap_draws
    )
    confidence = a.metrics.suite.bootstrap.confidence
    # every configuration's difference holds together with the others' (Bonferroni)
    level = 1 - (1 - confidence) / max(len(joined), 1)
    metrics = [m for m in ranked_metrics() if a.has_metric(m) and b.has_metric(m)]
    if paired:  # (replicate, config_id) per metric and run
        drawn = {
            (m.name, run.name): replicates_by_config(run.replicates, m.headline.column, run.configs)
            for m in metrics
            for run in (a, b)
        }
    rows = []
    for _, r in joined.iterrows():
        row = {"configuration": label(r)}
        for metric in metrics:
            score, name = metric.headline, metric.label
            ra, rb = _side(r, "_a"), _side(r, "_b")
            row[f"{name} {a.name}"] = score.cell(ra)
            row[f"{name} {b.name}"] = score.cell(rb)
            if paired:
                difference, low, high = paired_difference(
                    ra[score.column], drawn[(metric.name, a.name)][ra["config_id"]],
                    rb[score.column], drawn[(metric.name, b.name)][rb["config_id"]],
                    metric.interval, level,
                )  # fmt: skip
                row[f"{name} {b.name} - {a.name}"] = _ranged(difference, low, high, score.digits)
                b_higher, a_higher = low > 0, high < 0
                if b_higher or a_higher:
                    winner = b if b_higher == metric.higher_is_better else a
                    row[f"{name} verdict"] = f"{winner.name} better"
                else:
                    row[f"{name} verdict"] = "no clear difference"
            else:
                difference = rb[score.column] - ra[score.column]
                row[f"{name} {b.name} - {a.name}"] = _signed(difference, score.digits)
                overlap = _overlap(ra, rb, score.column)
                row[f"{name} intervals"] = {None: "n/a", True: "overlap", False: "differ"}[overlap]
        rows.append(row)
    if paired:
        how = (
            f"paired: both runs' bootstrap replicates drew the same prompts, so each interval "
            f"is of the difference itself; the {len(joined)} intervals hold together at "
            f"{confidence:.0%} (Bonferroni, each at {level:.2%})"
        )
        if a.record.spec.seed == b.record.spec.seed:
            how += "; the seeds are equal too, so each image has its counterpart"
    else:
        how = (
            "the runs' bootstrap replicates do not pair (other prompts, bootstrap settings, or "
            "evaluated before sdbatch recorded them), so `differ` only says that two "
            "intervals do not overlap"
        )
    lines = [
        f"Differences are {b.name} minus {a.name}, over the {len(joined)} configurations both "
        f"runs have; {how}."
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
    models = ", ".join(f"`{s.ref}` ({s.identity})" for s in r.sources.values())
    adapters = "".join(f"; adapter `{a.ref}` ({a.identity})" for a in r.adapters)
    lines = [
        f"Output `{run.out.location}`; model{'s' if len(r.sources) > 1 else ''} {models}"
        f"{adapters}, dtype {r.dtype or 'n/a'}, seed {r.spec.seed}, "
        f"{r.prompts.count} prompts (sha256 {r.prompts.sha256[:16]}).",
        f"CLIP `{clip.ref if clip else 'n/a'}` ({clip.identity if clip else 'n/a'}); "
        f"{m.truncated_prompts} prompts longer than CLIP's context were truncated "
        "(keeping end-of-text).",
    ]
    if m.extractor:
        e = m.extractor
        lines.append(
            f"{e.distance} features: `{e.name}`, {e.dim}-d, weights {e.weights}, "
            f"resize `{e.resize}`."
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
    return Section(f"Provenance: {run.name}", lines, appendix=True)
