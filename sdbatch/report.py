"""`sdbatch report`: OUT/metrics and the images -> OUT/report/index.html and OUT/report/report.md.

The HTML is one self-contained file (plots and grids inlined as data: URIs, no script, no network);
the Markdown shows the same tables and links the same PNGs, written beside it, for pasting into a
PR or a wiki. Given two outputs, every plot shows both runs and a table gives the per-configuration
differences, saying whether the confidence intervals overlap.

Example:
    >>> path = write_report(["out/demo"])          # out/demo/report/index.html
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
from PIL import Image, ImageDraw

from sdbatch.dataset import IMAGES, METRICS, Output
from sdbatch.errors import InputError

log = logging.getLogger("sdbatch")
REPORT = "report"
PARAMS = ["scheduler", "num_inference_steps", "guidance_scale"]
GRID_PROMPTS = 4  # prompts shown in the image grids
GRID_CELL = 128  # pixels per grid image (larger images are scaled down)


@dataclass
class Run:
    """One evaluated output: its per-configuration table and its records."""

    name: str
    out: Output
    configs: pd.DataFrame
    metrics: dict[str, Any]
    record: dict[str, Any]

    def has(self, column: str) -> bool:
        return column in self.configs and self.configs[column].notna().any()


@dataclass
class Figure:
    name: str  # file name, e.g. fid_vs_guidance.png
    title: str
    png: bytes


def load_run(location: str) -> Run:
    """Read an evaluated output; InputError when it has no metrics yet."""
    out = Output(location)
    record = out.read_run()
    metrics_path = out.path(METRICS, "metrics.json")
    if record is None or not out.fs.exists(metrics_path):
        raise InputError(f"OUT: {location} has no metrics/metrics.json; run sdbatch eval first")
    with out.fs.open(out.path(METRICS, "configs.parquet"), "rb") as f:
        configs = pd.read_parquet(f).sort_values(PARAMS, ignore_index=True)
    metrics = json.loads(out.fs.cat_file(metrics_path))
    return Run(record["spec"]["name"], out, configs, metrics, record)


def write_report(locations: list[str]) -> str:
    """Write the report of one output (or a comparison of two) into the first; returns its path.

    Raises:
        InputError: an output has no metrics, or more than two are given.
    """
    if not 1 <= len(locations) <= 2:
        raise InputError("OUT: give one output, or two to compare")
    # 1. read every run's metrics; two runs with the same name get their folder names
    runs = [load_run(location) for location in locations]
    if len(runs) == 2 and runs[0].name == runs[1].name:
        for run in runs:
            run.name = run.out.location.rstrip("/").rsplit("/", 1)[-1]
    # 2. plots, image grids and tables
    figures, missing = _plots(runs)
    grids = [grid for run in runs for grid in _grids(run, len(runs) > 1)]
    sections = _sections(runs, missing)
    # 3. write the PNGs, then the Markdown, then index.html last
    out = runs[0].out
    for figure in [*figures, *grids]:
        out.put(f"{REPORT}/{figure.name}", lambda tmp, png=figure.png: out.fs.pipe_file(tmp, png))
    markdown = _markdown(runs, sections, figures, grids).encode()
    out.put(f"{REPORT}/report.md", lambda tmp: out.fs.pipe_file(tmp, markdown))
    page = _html(runs, sections, figures, grids).encode()
    out.put(f"{REPORT}/index.html", lambda tmp: out.fs.pipe_file(tmp, page))
    path = f"{out.location}/{REPORT}/index.html"
    log.info("report: %s", path)
    return path


# -- summary and tables ------------------------------------------------------------------------


@dataclass
class Section:
    title: str
    lines: list[str]  # sentences (Markdown-ish: `code` only)
    table: pd.DataFrame | None = None


def _label(row: pd.Series) -> str:
    steps, guidance = row["num_inference_steps"], row["guidance_scale"]
    return f"{row['scheduler']}, {steps} steps, guidance {guidance:g}"


def _with_interval(row: pd.Series, metric: str, digits: int = 2) -> str:
    value, low, high = row.get(metric), row.get(f"{metric}_low"), row.get(f"{metric}_high")
    if value is None or pd.isna(value):
        return "n/a"
    if low is None or pd.isna(low):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def pareto_front(configs: pd.DataFrame) -> pd.Series:
    """True for configurations no other one beats on both FID (lower) and CLIP score (higher)."""
    fid, clip = configs["fid"].to_numpy(), configs["clip_score"].to_numpy()
    dominated = [
        bool(np.any((fid <= f) & (clip >= c) & ((fid < f) | (clip > c))))
        for f, c in zip(fid, clip, strict=True)
    ]
    return pd.Series(~np.array(dominated), index=configs.index)


def _overlap(a: pd.Series, b: pd.Series, metric: str) -> bool | None:
    low, high = f"{metric}_low", f"{metric}_high"
    if any(pd.isna(x.get(k)) for x in (a, b) for k in (low, high)):
        return None
    return bool(a[low] <= b[high] and b[low] <= a[high])


def _summary(run: Run) -> Section:
    configs = run.configs
    lines = []
    for metric, best_is, name in (("fid", "idxmin", "FID"), ("clip_score", "idxmax", "CLIP score")):
        if not run.has(metric):
            continue
        ranked = configs.dropna(subset=[metric])
        best = ranked.loc[getattr(ranked[metric], best_is)()]
        line = (
            f"Best by {name}: **{_label(best)}** (`{best['config_id']}`), "
            f"{_with_interval(best, metric)}, {best['seconds_per_image']:.3f} s/image."
        )
        others = ranked.drop(index=best.name)
        if len(others):
            second = others.loc[getattr(others[metric], best_is)()]
            overlap = _overlap(best, second, metric)
            if overlap is not None:
                verdict = "overlap: not clearly better" if overlap else "do not overlap"
                line += (
                    f" Runner-up {_label(second)}: {_with_interval(second, metric)}; "
                    f"the intervals {verdict}."
                )
        lines.append(line)
    flagged = run.metrics.get("flagged_images", 0)  # absent from metrics made before it existed
    if flagged:
        policy = run.metrics["suite"]["safety"]
        where = {"exclude": "excluded from", "include": "included in"}[policy]
        lines.append(
            f"The model's safety checker flagged {flagged} of {run.metrics['images']} images "
            f"(it makes them black); they are **{where}** every metric (suite `safety: {policy}`)."
        )
    if run.has("fid") and run.has("clip_score") and len(configs) > 1:
        front = configs[pareto_front(configs)].sort_values("fid")
        picks = "; ".join(
            f"{_label(r)} (FID {r['fid']:.2f}, CLIP {r['clip_score']:.2f}, "
            f"{r['seconds_per_image']:.3f} s/image)"
            for _, r in front.iterrows()
        )
        lines.append(
            f"FID-CLIP trade-off (Pareto front, no configuration beats these on both): {picks}."
        )
    return Section(f"Summary: {run.name}", lines)


def _config_table(run: Run) -> pd.DataFrame:
    table = pd.DataFrame(
        {
            "configuration": run.configs["config_id"],
            "scheduler": run.configs["scheduler"],
            "steps": run.configs["num_inference_steps"],
            "guidance": run.configs["guidance_scale"].map("{:g}".format),
            "images": run.configs["n_images"],
            "s/image": run.configs["seconds_per_image"].map("{:.3f}".format),
        }
    )
    if run.has("n_flagged"):  # the model has a safety checker
        policy = run.metrics["suite"]["safety"]
        counts = run.configs["n_flagged"].map(lambda n: "n/a" if pd.isna(n) else f"{n:.0f}")
        table.insert(5, f"flagged ({policy}d)", counts)
    if run.has("clip_score"):
        table["CLIP score [CI]"] = [
            _with_interval(r, "clip_score") for _, r in run.configs.iterrows()
        ]
    if run.has("fid"):
        table["FID [CI]"] = [_with_interval(r, "fid") for _, r in run.configs.iterrows()]
    for attribute in ("color", "shape", "size", "position"):
        column = f"{attribute}_accuracy"
        if run.has(column):
            table[f"{attribute} correct [CI]"] = [
                _with_interval(r, column) for _, r in run.configs.iterrows()
            ]
    if run.has("kid_mean"):
        table["KID"] = [
            f"{r['kid_mean']:.4f} ± {r['kid_std']:.4f}" for _, r in run.configs.iterrows()
        ]
    return table


def _comparison(a: Run, b: Run) -> Section:
    joined = a.configs.merge(b.configs, on=PARAMS, suffixes=("_a", "_b"))
    rows = []
    for _, r in joined.iterrows():
        row = {"configuration": _label(r)}
        for metric, name in (("clip_score", "CLIP score"), ("fid", "FID")):
            if not (a.has(metric) and b.has(metric)):
                continue
            ra, rb = _side(r, "_a"), _side(r, "_b")
            row[f"{name} {a.name}"] = _with_interval(ra, metric)
            row[f"{name} {b.name}"] = _with_interval(rb, metric)
            row[f"{name} diff"] = f"{rb[metric] - ra[metric]:+.2f}"
            overlap = _overlap(ra, rb, metric)
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
    extractor = m.get("extractor") or {}
    reference = m.get("reference") or {}
    clip = m.get("clip") or {}
    lines = [
        f"Output `{run.out.location}`; model `{r['model']['ref']}` ({r['model']['identity']}), "
        f"dtype {r.get('dtype', 'n/a')}, seed {r['spec']['seed']}, "
        f"{r['prompts']['count']} prompts (sha256 {r['prompts']['sha256'][:16]}).",
        f"CLIP `{clip.get('ref', 'n/a')}` ({clip.get('identity', 'n/a')}); "
        f"{m.get('truncated_prompts', 0)} prompts longer than CLIP's context were truncated "
        "(keeping end-of-text).",
    ]
    if extractor:
        lines.append(
            f"FID features: `{extractor['name']}`, {extractor['dim']}-d, weights "
            f"{extractor['weights']}, resize `{extractor['resize']}`."
        )
    if reference:
        lines.append(
            f"Reference: `{reference['source']}`, {reference['count']} images, statistics "
            f"{reference['sha256']}."
        )
    versions = ", ".join(f"{k} {v}" for k, v in sorted(m.get("versions", {}).items()))
    lines.append(f"Versions: {versions}. Evaluated {m.get('finished', 'n/a')}.")
    return Section(f"Provenance: {run.name}", lines)


def _sections(runs: list[Run], missing: list[str]) -> list[Section]:
    sections = [_summary(run) for run in runs]
    if missing:
        sections[0].lines += missing
    if len(runs) == 2:
        sections.append(_comparison(*runs))
    for run in runs:
        table = _config_table(run)
        sections.append(Section(f"All configurations: {run.name}", [], table))
    sections += [_provenance(run) for run in runs]
    return sections


# -- plots -------------------------------------------------------------------------------------


def _plots(runs: list[Run]) -> tuple[list[Figure], list[str]]:
    """The figures the data supports, and a sentence for each one it does not."""
    import matplotlib

    matplotlib.use("Agg")
    figures, missing = [], []
    has = {m: any(run.has(m) for run in runs) for m in ("fid", "clip_score")}
    for metric, name in (("fid", "FID"), ("clip_score", "CLIP score")):
        if not has[metric]:
            missing.append(f"{name} was not computed for this run, so it has no plots.")
            continue
        if max(run.configs["guidance_scale"].nunique() for run in runs) > 1:
            figures.append(_versus(runs, metric, name, "guidance_scale", "guidance scale"))
        if max(run.configs["num_inference_steps"].nunique() for run in runs) > 1:
            figures.append(_versus(runs, metric, name, "num_inference_steps", "steps"))
    if has["fid"] and has["clip_score"] and max(len(run.configs) for run in runs) > 1:
        figures.append(_tradeoff(runs))
    if max(len(run.configs) for run in runs) == 1:
        missing.append("A single configuration: there is nothing to plot against.")
    return figures, missing


def _versus(runs: list[Run], metric: str, name: str, x: str, x_name: str) -> Figure:
    """`metric` against `x`, one line per (scheduler, the other parameter), intervals as bands."""
    import matplotlib.pyplot as plt

    other = "num_inference_steps" if x == "guidance_scale" else "guidance_scale"
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for style, run in zip(("-", "--"), runs, strict=False):
        if not run.has(metric):
            continue
        for (scheduler, value), group in run.configs.groupby(["scheduler", other], sort=True):
            group = group.sort_values(x)
            unit = "steps" if other == "num_inference_steps" else "guidance"
            label = f"{scheduler}, {value:g} {unit}" + (f" ({run.name})" if len(runs) > 1 else "")
            line = ax.plot(group[x], group[metric], style, marker="o", label=label)[0]
            if f"{metric}_low" in group and group[f"{metric}_low"].notna().all():
                ax.fill_between(
                    group[x], group[f"{metric}_low"], group[f"{metric}_high"],
                    color=line.get_color(), alpha=0.15,
                )  # fmt: skip
    ax.set_xlabel(x_name)
    ax.set_ylabel(name + (" (lower is better)" if metric == "fid" else " (higher is better)"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    title = f"{name} vs {x_name}"
    ax.set_title(title)
    return Figure(f"{metric}_vs_{x}.png", title, _png(fig))


def _tradeoff(runs: list[Run]) -> Figure:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for marker, run in zip(("o", "s"), runs, strict=False):
        if not (run.has("fid") and run.has("clip_score")):
            continue
        configs = run.configs
        suffix = f" ({run.name})" if len(runs) > 1 else ""
        points = ax.scatter(
            configs["clip_score"], configs["fid"], c=configs["seconds_per_image"], cmap="viridis",
            marker=marker, label=f"configurations{suffix}",
        )  # fmt: skip
        front = configs[pareto_front(configs)].sort_values("clip_score")
        ax.plot(front["clip_score"], front["fid"], "r-", marker=marker, mfc="none", ms=11,
                label=f"Pareto front{suffix}")  # fmt: skip
    fig.colorbar(points, ax=ax, label="seconds per image")
    ax.set_xlabel("CLIP score (higher is better)")
    ax.set_ylabel("FID (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    title = "FID-CLIP trade-off, colored by cost"
    ax.set_title(title)
    return Figure("tradeoff.png", title, _png(fig))


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


# -- image grids -------------------------------------------------------------------------------


def _grids(run: Run, named: bool) -> list[Figure]:
    """For the first few prompts, image 0 (the same seed) of every configuration side by side."""
    dataset = pads.dataset(run.out.path(IMAGES), filesystem=run.out.fs, format="parquet")
    prompt_ids = sorted(set(dataset.to_table(columns=["prompt_id"])["prompt_id"].to_pylist()))
    chosen = prompt_ids[:GRID_PROMPTS]
    table = dataset.to_table(
        columns=["image", "prompt_id", "prompt", "sample_index", "config_id"],
        filter=(pads.field("sample_index") == 0) & pads.field("prompt_id").isin(chosen),
    ).to_pandas()
    order = list(run.configs["config_id"])
    labels = {r["config_id"]: _short_label(r) for _, r in run.configs.iterrows()}
    grids = []
    for i, prompt_id in enumerate(chosen):
        rows = table[table["prompt_id"] == prompt_id].set_index("config_id")
        cells = [(labels[c], rows.loc[c, "image"]["bytes"]) for c in order if c in rows.index]
        prompt = rows["prompt"].iloc[0]
        title = f"{prompt_id}: {prompt}" + (f" ({run.name})" if named else "")
        prefix = f"{run.name}-" if named else ""
        grids.append(Figure(f"{prefix}grid-{i}.png", title, _grid_png(cells)))
    return grids


def _short_label(row: pd.Series) -> str:
    return f"{row['scheduler']} {row['num_inference_steps']}st g{row['guidance_scale']:g}"


def _grid_png(cells: list[tuple[str, bytes]]) -> bytes:
    header = 14
    sheet = Image.new("RGB", (GRID_CELL * len(cells), GRID_CELL + header), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, blob) in enumerate(cells):
        image = Image.open(io.BytesIO(blob)).convert("RGB")
        # Small images are enlarged pixel by pixel (no blur to hide detail), large ones filtered.
        shrink = max(image.size) > GRID_CELL
        resample = Image.Resampling.LANCZOS if shrink else Image.Resampling.NEAREST
        image = image.resize((GRID_CELL, GRID_CELL), resample)
        sheet.paste(image, (i * GRID_CELL, header))
        draw.text((i * GRID_CELL + 2, 1), label[:22], fill="black")
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


# -- rendering ---------------------------------------------------------------------------------


def _markdown(
    runs: list[Run], sections: list[Section], figures: list[Figure], grids: list[Figure]
) -> str:
    parts = [f"# sdbatch report: {' vs '.join(run.name for run in runs)}", ""]
    for section in sections:
        parts += [f"## {section.title}", ""]
        parts += [f"- {line}" for line in section.lines]
        if section.table is not None:
            parts += ["", _markdown_table(section.table)]
        parts.append("")
    parts += ["## Plots", ""] + [f"![{f.title}]({f.name})" for f in figures]
    parts += ["", "## Images (same seed across configurations)", ""]
    for grid in grids:
        parts += [f"**{grid.title}**", "", f"![{grid.title}]({grid.name})", ""]
    return "\n".join(parts) + "\n"


def _markdown_table(table: pd.DataFrame) -> str:
    cells = lambda row: "| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |"  # noqa: E731
    lines = [cells(table.columns), "|" + "---|" * len(table.columns)]
    return "\n".join(lines + [cells(row) for row in table.itertuples(index=False)])


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; font-size: 13px; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f3f3f3; }
figure { margin: 1em 0; }
figcaption { font-size: 13px; color: #555; }
img { max-width: 100%; }
.grid img { image-rendering: pixelated; }
"""


def _html(
    runs: list[Run], sections: list[Section], figures: list[Figure], grids: list[Figure]
) -> str:
    title = f"sdbatch report: {' vs '.join(run.name for run in runs)}"
    body = [f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.lines:
            items = "".join(f"<li>{_inline(line)}</li>" for line in section.lines)
            body.append(f"<ul>{items}</ul>")
        if section.table is not None:
            body.append(section.table.to_html(index=False, border=0, escape=True))
    body.append("<h2>Plots</h2>")
    body += [_figure(f, "plot") for f in figures]
    body.append("<h2>Images (same seed across configurations)</h2>")
    body += [_figure(g, "grid") for g in grids]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )


def _figure(figure: Figure, kind: str) -> str:
    data = base64.b64encode(figure.png).decode()
    caption = html.escape(figure.title)
    return (
        f'<figure class="{kind}"><img alt="{caption}" src="data:image/png;base64,{data}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _inline(line: str) -> str:
    """Escape a sentence, then render its `code` and **bold** spans."""
    text = html.escape(line)
    for mark, tag in (("**", "strong"), ("`", "code")):
        pieces = text.split(mark)
        text = "".join(
            piece if i % 2 == 0 else f"<{tag}>{piece}</{tag}>" for i, piece in enumerate(pieces)
        )
    return text
