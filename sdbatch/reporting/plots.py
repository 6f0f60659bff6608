"""The report's plots (matplotlib, PNG): each ranked metric's main effects (a panel per sweep
axis), each ranked metric against guidance scale and against steps (a line per model and adapter
too, when a run has several), against adapter scale, and the trade-off between two metrics
colored by cost (model evaluations per image), with its Pareto front. Lines that coincide
stay visible, and every trade-off point is numbered and named in a key. What the data cannot
support is said in a sentence instead of drawn."""

from __future__ import annotations

import io
import math
import re
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from sdbatch.evaluation.compare import group_means, model_names
from sdbatch.evaluation.metric import Metric
from sdbatch.evaluation.registry import TRADEOFF, ranked_metrics
from sdbatch.reporting.parts import Figure
from sdbatch.reporting.runs import MODEL, Run
from sdbatch.reporting.summary import AXIS_NAMES, pareto_front

if TYPE_CHECKING:
    import matplotlib.figure

# The page is 1100 px wide (render.py): at this size and dpi a figure is never scaled down, so a
# 9 pt font stays 9 pt.
WIDTH, DPI, FONT = 11.0, 100, 9
# Lines differ in marker and dash as well as color: schedulers that agree draw curves that
# coincide, and a color alone is lost under the next line (and to color-blind readers).
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
DASHES = (
    "-", "--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 3)), (0, (8, 2)), (0, (3, 1, 1, 1, 1, 1)),
)  # fmt: skip
# More lines than this in one panel are hard to follow: one panel per scheduler instead.
MAX_LINES = 6
RUN_MARKERS = ("o", "s")  # the trade-off's points, per run
# What a line of a plot against an axis holds fixed (besides model and scheduler), and in words.
OTHER_AXES = {
    "guidance_scale": ("num_inference_steps",),
    "num_inference_steps": ("guidance_scale",),
    "strength": ("num_inference_steps", "guidance_scale"),
}
WORDS = {"num_inference_steps": "{:g} steps", "guidance_scale": "guidance {:g}"}


def plots(runs: list[Run]) -> tuple[list[Figure], list[str]]:
    """The figures the data supports, main effects first, and a sentence for each one it does
    not."""
    effects, versus, missing = [], [], []
    for run in runs:
        if run.effects is None:
            missing.append(
                f"{run.name} was evaluated before sdbatch computed main effects, so it has no "
                "main-effects plot; rerun sdbatch eval."
            )
    confidence = percent([run.metrics.suite.bootstrap.confidence for run in runs])
    several = max(len(run.configs) for run in runs) > 1
    absent = [m for m in ranked_metrics() if not any(run.has_metric(m) for run in runs)]
    if absent and several:
        shown = [m.label for m in ranked_metrics() if m not in absent]
        without = ", ".join(m.label for m in absent)
        missing.append(
            f"Not computed by the suite, so not plotted: {without}"
            + (f" (the plots show {', '.join(shown)})" if shown else "")
            + (", and no trade-off plot" if any(m in absent for m in TRADEOFF) else "")
            + "."
        )
    for metric in ranked_metrics():
        if metric in absent:
            continue
        tables = [table for run in runs if (table := _effects(run, metric)) is not None]
        if tables:
            caption = (
                f"{metric.label}: main effects. Each level's mean over the configurations at "
                f"that level (averaged over the other axes), with its "
                f"{percent(pd.concat(tables)['confidence'])} interval; the dotted line is the "
                "axis's first level, the baseline."
            )
            figure = effects_figure(runs, metric)
            effects.append(encode_figure(figure, f"{metric.name}_effects.png", caption))
        for x in ("guidance_scale", "num_inference_steps"):
            if max(run.configs[x].nunique() for run in runs) > 1:
                caption = (
                    f"{metric.label} vs {AXIS_NAMES[x]}: each line shifted a little sideways so "
                    f"that equal values stay visible; bars are {confidence} intervals."
                )
                figure = versus_figure(runs, metric, x)
                versus.append(encode_figure(figure, f"{metric.name}_vs_{x}.png", caption))
        if any(_adapted(run, metric) for run in runs):
            caption = (
                f"{metric.label} vs adapter scale: a line per model and adapter, each point the "
                "mean over the configurations at that scale (the other axes averaged out), bars "
                f"its {confidence} interval from the same bootstrap replicates; dotted lines: "
                "each model without an adapter."
            )
            figure = scale_figure(runs, metric)
            versus.append(encode_figure(figure, f"{metric.name}_vs_lora_scale.png", caption))
    figures = effects + versus
    if several and any(all(run.has_metric(m) for m in TRADEOFF) for run in runs):
        x, y = TRADEOFF
        caption = (
            f"{y.label}-{x.label} trade-off, colored by cost: each configuration is numbered "
            "and named in the key (* on the Pareto front)."
        )
        figures.append(encode_figure(tradeoff_figure(runs), "tradeoff.png", caption))
    if not several:
        missing.append("A single configuration: there is nothing to plot against.")
    return figures, missing


def axis_label(metric: Metric) -> str:
    """A metric's axis label, with its direction."""
    return f"{metric.label} ({'higher' if metric.higher_is_better else 'lower'} is better)"


def effects_figure(runs: list[Run], metric: Metric) -> matplotlib.figure.Figure:
    """`metric`'s main effects: a panel per sweep axis with each level's mean over the other
    axes and its interval, a dotted line at the axis's baseline (its first level)."""
    tables = [(run, table) for run in runs if (table := _effects(run, metric)) is not None]
    axes = [a for a in AXIS_NAMES if any(a in set(table["axis"]) for _, table in tables)]
    fig = _figure(min(WIDTH, 1.5 + 3 * len(axes)), 3.6)
    panels = fig.subplots(1, len(axes), sharey=True, squeeze=False)[0]
    offsets = _dodge(len(tables))
    legend = {}
    for ax, axis in zip(panels, axes, strict=True):
        levels = list(
            dict.fromkeys(level for _, t in tables for level in t.loc[t["axis"] == axis, "level"])
        )
        baselines = set()
        for i, (run, table) in enumerate(tables):
            rows = table[table["axis"] == axis]
            if rows.empty:  # a run that did not sweep this axis
                continue
            xs = rows["level"].map(levels.index).to_numpy() + offsets[i]
            style = _style(i)
            _bars(ax, xs, rows["low"], rows["high"], style["color"])
            (legend[run.name],) = ax.plot(
                xs, rows["mean"], color=style["color"], marker=style["marker"], linestyle="none",
                label=run.name,
            )  # fmt: skip
            baseline = rows[rows["level"] == rows["baseline"]]
            ax.axhline(baseline["mean"].iloc[0], color=style["color"], linestyle=":", lw=1)
            baselines.add(baseline["level"].iloc[0])
        # a model's reference can be long: wrapped to its share of the panel's width
        chars = max(8, int(WIDTH / len(axes) / len(levels) / (0.6 * FONT / 72)))
        ticks = [_wrap(lv, chars) + ("\n(baseline)" if lv in baselines else "") for lv in levels]
        ax.set_xticks(range(len(levels)), ticks)
        ax.set_xlim(-0.5, len(levels) - 0.5)
        ax.set_xlabel(AXIS_NAMES[axis])
        ax.grid(axis="y", alpha=0.3)
    panels[0].set_ylabel(axis_label(metric))
    if len(runs) > 1:
        fig.legend(legend.values(), legend.keys(), loc="outside right upper", frameon=False)
    fig.suptitle(f"{metric.label}: main effects")
    return fig


def versus_figure(runs: list[Run], metric: Metric, x: str) -> matplotlib.figure.Figure:
    """`metric` against sweep axis `x` (its levels evenly spaced), a line per (model and adapter
    when several, scheduler, the other parameters (OTHER_AXES), run) with intervals as error bars;
    a panel per scheduler when lines are many."""
    column = metric.headline.column
    others = OTHER_AXES[x]
    drawn = [run for run in runs if run.has_metric(metric)]
    lines = [
        (run, scheduler, tuple(values), model, group.sort_values(x))
        for run in drawn
        for (model, scheduler, *values), group in _by_model(run).groupby(
            ["_model", "scheduler", *others], sort=True, observed=True
        )
    ]
    schedulers = list(dict.fromkeys(scheduler for _, scheduler, _, _, _ in lines))
    faceted = len(lines) > MAX_LINES and len(schedulers) > 1

    def name(run: Run, scheduler: str, values: tuple, model: str) -> str:
        # a panel per scheduler: its title names the scheduler; a line keeps its style across panels
        words = ", ".join(WORDS[a].format(v) for a, v in zip(others, values, strict=True))
        words = words if faceted else f"{scheduler}, {words}"
        words = f"{model}, {words}" if model else words
        return words + (f" ({run.name})" if len(runs) > 1 else "")

    names = list(dict.fromkeys(name(*line[:4]) for line in lines))
    columns = min(3, len(schedulers)) if faceted else 1
    rows = math.ceil(len(schedulers) / columns) if faceted else 1
    fig = _figure(WIDTH if faceted else 9.0, 3.4 * rows + (0.8 if faceted else 1.0))
    panels = fig.subplots(rows, columns, sharey=True, squeeze=False).ravel()
    levels = sorted({value for run in drawn for value in run.configs[x]})
    offsets = _dodge(len(names))
    legend = {}
    for run, scheduler, value, model, group in lines:
        i = names.index(name(run, scheduler, value, model))
        ax = panels[schedulers.index(scheduler) if faceted else 0]
        xs = group[x].map(levels.index).to_numpy() + offsets[i]
        style = _style(i)
        if f"{column}_low" in group:
            _bars(ax, xs, group[f"{column}_low"], group[f"{column}_high"], _faint(style["color"]))
        (legend[names[i]],) = ax.plot(xs, group[column], label=names[i], **style)
    shown = len(schedulers) if faceted else 1
    for ax in panels[shown:]:
        ax.remove()
    for k, ax in enumerate(panels[:shown]):
        if faceted:
            ax.set_title(schedulers[k])
        ax.set_xticks(range(len(levels)), [f"{level:g}" for level in levels])
        ax.set_xlim(-0.5, len(levels) - 0.5)
        ax.set_xlabel(AXIS_NAMES[x])
        ax.grid(alpha=0.3)
    for ax in panels[::columns]:
        ax.set_ylabel(axis_label(metric))
    handles = [legend[n] for n in names]  # one entry per style, from any panel that drew it
    if faceted:
        fig.legend(handles, names, loc="outside lower center", ncols=_columns(names))
    else:
        fig.legend(handles, names, loc="outside right upper", frameon=False)
    fig.suptitle(f"{metric.label} vs {AXIS_NAMES[x]}")
    return fig


def scale_figure(runs: list[Run], metric: Metric) -> matplotlib.figure.Figure:
    """`metric` against adapter scale: a line per (model, adapter, run), each point the mean over
    the configurations at that scale with its interval; a dotted line per model without an
    adapter at its mean over its configurations."""
    column = metric.headline.column
    drawn = [run for run in runs if _adapted(run, metric)]
    lines, plain = [], []  # (name, means by scale), (name, mean)
    for run in drawn:
        suffix = f" ({run.name})" if len(runs) > 1 else ""
        configs, confidence = run.configs, run.metrics.suite.bootstrap.confidence
        adapted = configs["lora"].notna()
        for (model, lora), group in configs[adapted].groupby(["model", "lora"], sort=False):
            means = group_means(group, run.replicates, column, group["lora_scale"], confidence)
            lines.append((f"{model} + {lora}{suffix}", means.sort_index()))
        without = configs[~adapted]
        means = group_means(without, run.replicates, column, model_names(without), confidence)
        plain += [(f"{model}, no adapter{suffix}", m) for model, m in means["mean"].items()]
    scales = sorted({s for _, means in lines for s in means.index})
    # sideways offsets in units of the closest two scales, so that equal values stay apart
    gap = min(np.diff(scales), default=1.0)
    offsets = _dodge(len(lines)) * gap
    fig = _figure(9.0, 4.4)
    ax = fig.subplots()
    for i, (name, means) in enumerate(lines):
        style = _style(i)
        xs = means.index.to_numpy(float) + offsets[i]
        _bars(ax, xs, means["low"], means["high"], _faint(style["color"]))
        ax.plot(xs, means["mean"], label=name, **style)
    for j, (name, mean) in enumerate(plain, start=len(lines)):
        ax.axhline(mean, color=_style(j)["color"], linestyle=":", lw=1.5, label=name)
    ax.set_xticks(scales, [f"{s:g}" for s in scales])
    ax.set_xlabel("adapter scale")
    ax.set_ylabel(axis_label(metric))
    ax.grid(alpha=0.3)
    names = [line.get_label() for line in ax.lines if not line.get_label().startswith("_")]
    fig.legend(loc="outside lower center", ncols=_columns(names))
    fig.suptitle(f"{metric.label} vs adapter scale")
    return fig


def tradeoff_figure(
    runs: list[Run], metrics: tuple[Metric, Metric] = TRADEOFF
) -> matplotlib.figure.Figure:
    """The trade-off of two metrics (x, y; default `TRADEOFF`): every configuration a point
    colored by cost and numbered, named in a key beside the plot (* on the Pareto front), each
    run's front joined."""
    from matplotlib.ticker import MaxNLocator
    from matplotlib.transforms import offset_copy

    x_metric, y_metric = metrics
    x, y = x_metric.headline.column, y_metric.headline.column
    drawn = [
        (run, run.configs.assign(front=pareto_front(run.configs, metrics)), marker)
        for run, marker in zip(runs, RUN_MARKERS, strict=False)
        if run.has(x) and run.has(y)
    ]
    suffixes = {run.name: f" ({run.name})" if len(runs) > 1 else "" for run in runs}
    numbered = [(run, row) for run, configs, _ in drawn for _, row in configs.iterrows()]
    # models and adapters by a short tag in the key (m1, m2, ...), named in full in the legend
    tags = {n: f"m{k}" for k, n in enumerate(dict.fromkeys(n for r in runs for n in r.models), 1)}
    key = [
        f"{i:>2} {tags[row[MODEL]] + ' ' if MODEL in row else ''}{short_label(row)}"
        f"{suffixes[run.name]}{' *' if row['front'] else ''}"
        for i, (run, row) in enumerate(numbered, start=1)
    ]
    # the key's columns, sized from its longest line (a monospace character is 0.6 em wide)
    per_column = max(16, math.ceil(len(key) / 2))
    columns = math.ceil(len(key) / per_column)
    column_width = (max(map(len, key)) + 2) * 0.6 * FONT / 72
    title = "key (* on the Pareto front)"
    key_width = max(columns * column_width, len(title) * 0.6 * FONT / 72)
    fig = _figure(WIDTH, max(4.8, 1.8 + per_column * 1.3 * FONT / 72))
    ax, key_ax = fig.subplots(1, 2, width_ratios=(WIDTH - key_width, key_width))
    for run, configs, marker in drawn:
        points = ax.scatter(
            configs[x], configs[y], c=configs["unet_evals_per_image"], cmap="viridis",
            marker=marker, s=40, label=f"configurations{suffixes[run.name]}", zorder=3,
        )  # fmt: skip
        front = configs[configs["front"]].sort_values(x)
        ax.plot(front[x], front[y], "r-", marker=marker, mfc="none", ms=11,
                label=f"Pareto front{suffixes[run.name]}")  # fmt: skip
    fig.colorbar(
        points, ax=ax, label="model evaluations (UNet calls) per image",
        ticks=MaxNLocator(integer=True),
    )  # fmt: skip
    ax.set_xlabel(axis_label(x_metric))
    ax.set_ylabel(axis_label(y_metric))
    ax.grid(alpha=0.3)
    ax.margins(0.08)  # room for the numbers at the edges
    for name, tag in tags.items():
        ax.plot([], [], linestyle="none", label=f"{tag} = {name}")
    labels = ax.get_legend_handles_labels()[1]
    # outside: it would cover points and numbers
    fig.legend(loc="outside lower center", ncols=4 if not tags else _columns(labels))
    fig.suptitle(f"{y_metric.label}-{x_metric.label} trade-off, colored by cost")
    key_ax.axis("off")
    key_ax.set_title(title, fontsize=FONT, loc="left")
    for c in range(columns):
        text = "\n".join(key[c * per_column : (c + 1) * per_column])
        shift = offset_copy(key_ax.transAxes, fig=fig, x=c * column_width, units="inches")
        key_ax.text(0, 1, text, va="top", family="monospace", fontsize=FONT, transform=shift)
    # numbers are placed in pixels: the layout is settled, then kept
    fig.canvas.draw()
    fig.set_layout_engine("none")
    every = pd.concat([configs for _, configs, _ in drawn])
    # marker radii in pixels: a point 40 pt² (9 px across), a front's ring 11 pt (15 px)
    _number_points(ax, every[[x, y]].to_numpy(float), np.where(every["front"], 8.0, 5.0))
    return fig


def short_label(row: pd.Series) -> str:
    """A configuration in a few characters, as its config_id begins: `euler s20 g4`, with the
    task's strength or outpaint expansion where it has one (`str0.6`, `t0-r16-b0-l0`)."""
    text = f"{row['scheduler']} s{row['num_inference_steps']} g{row['guidance_scale']:g}"
    if pd.notna(row.get("strength")):
        text += f" str{row['strength']:g}"
    if pd.notna(row.get("outpaint")):
        text += f" {row['outpaint']}"
    return text


def _by_model(run: Run) -> pd.DataFrame:
    """The run's configurations with `_model`: their model and adapter, in the sweep's order
    ("" for every one when the run has one)."""
    if MODEL not in run.configs:
        return run.configs.assign(_model="")
    return run.configs.assign(_model=pd.Categorical(run.configs[MODEL], run.models))


def _adapted(run: Run, metric: Metric) -> bool:
    """Whether the run has configurations with an adapter, and replicates of `metric`'s
    headline to plot them with intervals."""
    return (
        run.baseline is not None
        and run.has("lora")
        and run.replicates is not None
        and metric.headline.column in run.replicates
        and run.has_metric(metric)
    )


def _effects(run: Run, metric: Metric) -> pd.DataFrame | None:
    """The run's main effects on `metric`'s headline score, or None when it has none."""
    if run.effects is None:
        return None
    table = run.effects[run.effects["column"] == metric.headline.column]
    return table if len(table) else None


# Points closer than this (pixels) are drawn on top of each other: they share one label.
TOGETHER = 6.0
# Where a number goes around its point (offset in points, alignment): beside it, then further.
AROUND = [
    ((5, 3), "left", "bottom"), ((5, -3), "left", "top"), ((-5, 3), "right", "bottom"),
    ((-5, -3), "right", "top"), ((0, 7), "center", "bottom"), ((0, -7), "center", "top"),
    ((8, 0), "left", "center"), ((-8, 0), "right", "center"),
]  # fmt: skip
PLACES = [((dx * k, dy * k), ha, va) for k in (1, 2.5) for (dx, dy), ha, va in AROUND]


def _number_points(ax, points: np.ndarray, radii: np.ndarray) -> None:
    """Number the points 1, 2, ... beside them: points drawn on top of each other share a label
    ("2,5"); each label takes the nearest place that covers no marker (`radii` in pixels) and
    no label placed before it, or else the least covered."""
    from matplotlib.transforms import Bbox

    pixels = ax.transData.transform(points)
    groups: list[list[int]] = []
    for i, p in enumerate(pixels):
        near = next((g for g in groups if np.hypot(*(pixels[g[0]] - p)) < TOGETHER), None)
        if near is None:
            groups.append([i])
        else:
            near.append(i)
    taken = [
        Bbox.from_extents(x - r, y - r, x + r, y + r)
        for (x, y), r in zip(pixels, radii, strict=True)
    ]
    renderer = ax.figure.canvas.get_renderer()
    for group in groups:
        label = ax.annotate(
            ",".join(str(i + 1) for i in group), points[group[0]], xytext=(0, 0),
            textcoords="offset points", fontsize=FONT, in_layout=False,
        )  # fmt: skip

        def covered(place: tuple, label=label) -> float:
            label.xyann, ha, va = place
            label.set(ha=ha, va=va)
            box = label.get_window_extent(renderer).padded(1)
            return sum(_area(Bbox.intersection(box, other)) for other in taken)

        best = min(PLACES, key=covered)  # the first (nearest) of the least covered places
        covered(best)  # the label goes there
        taken.append(label.get_window_extent(renderer))


def _area(box) -> float:
    return 0.0 if box is None else box.width * box.height


def _wrap(text: str, chars: int) -> str:
    """`text` in lines of at most `chars` characters, broken after a path's separators where it
    can be."""
    lines, line = [], ""
    for part in re.split(r"(?<=[/:])", text):
        while len(line + part) > chars and (line or len(part) > chars):
            if line:
                lines.append(line)
                line = ""
            else:
                lines.append(part[:chars])
                part = part[chars:]
        line += part
    return "\n".join([*lines, line])


def _columns(names: list[str]) -> int:
    """How many columns of a legend under a figure fit the page's width (at most 4)."""
    width = (max(map(len, names)) * 0.6 * FONT + 30) / 72  # a name and its line sample, inches
    return max(1, min(4, len(names), int(WIDTH / width)))


def _dodge(count: int) -> np.ndarray:
    """Sideways offsets, in level widths, for `count` series sharing each level: error bars of
    equal values stand side by side, and neighbouring levels' groups stay apart."""
    step = min(0.12, 0.4 / max(count - 1, 1))
    return (np.arange(count) - (count - 1) / 2) * step


def _style(i: int) -> dict[str, object]:
    return {
        "color": f"C{i % 10}",
        "marker": MARKERS[i % len(MARKERS)],
        "linestyle": DASHES[i % len(DASHES)],
    }


def _faint(color: str) -> tuple[float, ...]:
    """A line's color for its error bars: lighter, so that bars crossing a line do not hide it."""
    from matplotlib.colors import to_rgba

    return to_rgba(color, 0.5)


def _bars(ax, xs: np.ndarray, low: pd.Series, high: pd.Series, color) -> None:
    """Interval bars from `low` to `high`, drawn apart from the estimate's marker: a percentile
    bootstrap interval need not contain the estimate (FID's bias can put it below every
    replicate), so the bars are not lengths around it."""
    low, high = low.to_numpy(float), high.to_numpy(float)
    ax.errorbar(xs, (low + high) / 2, yerr=(high - low) / 2, fmt="none", ecolor=color, capsize=3)


def _figure(width: float, height: float) -> matplotlib.figure.Figure:
    """A figure outside pyplot (nothing global to close), laid out by matplotlib's constrained
    layout, which keeps legends outside the axes."""
    import matplotlib.figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = matplotlib.figure.Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # a renderer to measure labels with (the trade-off's numbers)
    return fig


def encode_figure(fig: matplotlib.figure.Figure, name: str, caption: str) -> Figure:
    """The figure as a PNG named `name`, under `caption`."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return Figure(name, caption, buffer.getvalue())


def percent(confidences: pd.Series | list[float]) -> str:
    """The intervals' confidence in words, both runs' when they differ: `95%`."""
    return " and ".join(f"{c:.0%}" for c in dict.fromkeys(confidences))
