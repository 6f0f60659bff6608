"""The report's plots (matplotlib, PNG): each ranked metric against guidance scale and against
steps, with intervals as bands, and the trade-off between two metrics colored by cost (model
evaluations per image), with its Pareto front. What the data cannot support is said in a sentence
instead of drawn."""

from __future__ import annotations

import io
from typing import Any

from sdbatch.evaluation.metric import Metric
from sdbatch.evaluation.registry import TRADEOFF, ranked_metrics
from sdbatch.reporting.parts import Figure
from sdbatch.reporting.runs import Run
from sdbatch.reporting.summary import pareto_front


def plots(runs: list[Run]) -> tuple[list[Figure], list[str]]:
    """The figures the data supports, and a sentence for each one it does not."""
    import matplotlib

    matplotlib.use("Agg")
    figures, missing = [], []
    for metric in ranked_metrics():
        if not any(run.has_metric(metric) for run in runs):
            missing.append(f"{metric.label} was not computed for this run, so it has no plots.")
            continue
        if max(run.configs["guidance_scale"].nunique() for run in runs) > 1:
            figures.append(_versus(runs, metric, "guidance_scale", "guidance scale"))
        if max(run.configs["num_inference_steps"].nunique() for run in runs) > 1:
            figures.append(_versus(runs, metric, "num_inference_steps", "steps"))
    several = max(len(run.configs) for run in runs) > 1
    if several and all(any(run.has_metric(m) for run in runs) for m in TRADEOFF):
        figures.append(_tradeoff(runs))
    if not several:
        missing.append("A single configuration: there is nothing to plot against.")
    return figures, missing


def axis_label(metric: Metric) -> str:
    return f"{metric.label} ({'higher' if metric.higher_is_better else 'lower'} is better)"


def _versus(runs: list[Run], metric: Metric, x: str, x_name: str) -> Figure:
    """`metric` against `x`, one line per (scheduler, the other parameter), intervals as bands."""
    import matplotlib.pyplot as plt

    column = metric.headline.column
    other = "num_inference_steps" if x == "guidance_scale" else "guidance_scale"
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for style, run in zip(("-", "--"), runs, strict=False):
        if not run.has_metric(metric):
            continue
        for (scheduler, value), group in run.configs.groupby(["scheduler", other], sort=True):
            group = group.sort_values(x)
            unit = "steps" if other == "num_inference_steps" else "guidance"
            label = f"{scheduler}, {value:g} {unit}" + (f" ({run.name})" if len(runs) > 1 else "")
            line = ax.plot(group[x], group[column], style, marker="o", label=label)[0]
            if f"{column}_low" in group and group[f"{column}_low"].notna().all():
                ax.fill_between(
                    group[x], group[f"{column}_low"], group[f"{column}_high"],
                    color=line.get_color(), alpha=0.15,
                )  # fmt: skip
    ax.set_xlabel(x_name)
    ax.set_ylabel(axis_label(metric))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    title = f"{metric.label} vs {x_name}"
    ax.set_title(title)
    return Figure(f"{metric.name}_vs_{x}.png", title, _png(fig))


def _tradeoff(runs: list[Run]) -> Figure:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    x_metric, y_metric = TRADEOFF
    x, y = x_metric.headline.column, y_metric.headline.column
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for marker, run in zip(("o", "s"), runs, strict=False):
        if not (run.has(x) and run.has(y)):
            continue
        configs = run.configs
        suffix = f" ({run.name})" if len(runs) > 1 else ""
        points = ax.scatter(
            configs[x], configs[y], c=configs["unet_evals_per_image"], cmap="viridis",
            marker=marker, label=f"configurations{suffix}",
        )  # fmt: skip
        front = configs[pareto_front(configs)].sort_values(x)
        ax.plot(front[x], front[y], "r-", marker=marker, mfc="none", ms=11,
                label=f"Pareto front{suffix}")  # fmt: skip
    fig.colorbar(
        points, ax=ax, label="model evaluations (UNet calls) per image",
        ticks=MaxNLocator(integer=True),
    )  # fmt: skip
    ax.set_xlabel(axis_label(x_metric))
    ax.set_ylabel(axis_label(y_metric))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    title = f"{y_metric.label}-{x_metric.label} trade-off, colored by cost"
    ax.set_title(title)
    return Figure("tradeoff.png", title, _png(fig))


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
