"""The report of an image-conditioned run (img2img, inpaint, outpaint, depth2img; its output has
sources.parquet): source | result pairs per configuration, the inpainting mask outlined on the
source and the original canvas framed in each outpainted result; each metric of the edit against
strength, with intervals; a table of those means per strength; and the trade-off between
agreement with the prompt and preservation of the source (the report's trade-off plot, on
`PRESERVATION_TRADEOFF`). A text2img run has none of these, and its report is unchanged."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
from PIL import Image

from sdbatch.evaluation.registry import PRESERVATION_TRADEOFF, STRENGTH_METRICS
from sdbatch.evaluation.sources import read_sources
from sdbatch.output import SOURCES
from sdbatch.reporting.grids import (
    MAX_CELL,
    choose_prompts,
    image_dataset,
    read_images,
    table_png,
)
from sdbatch.reporting.parts import Figure, Gallery, Section
from sdbatch.reporting.plots import encode_figure, percent, tradeoff_figure, versus_figure
from sdbatch.reporting.runs import Run
from sdbatch.spec import Expansion

OUTLINE = (255, 0, 255)  # magenta: no color of the shapes world, so it reads as a mark
PRESERVED_WHERE = {
    "img2img": "the whole image",
    "depth2img": "the whole image",
    "inpaint": "outside the mask",
    "outpaint": "the original canvas",
}


def task_sections(run: Run) -> list[Section]:
    """What the run's task is, where preservation is measured, and each metric of the edit per
    strength (from effects.parquet) when strength was swept."""
    if not run.sources:
        return []
    tasks = _tasks(run)
    where = "; ".join(f"{t}: {PRESERVED_WHERE.get(t, 'the whole image')}" for t in tasks)
    lines = [
        f"Image-conditioned: {', '.join(tasks)}, from the sources in `{SOURCES}`. PSNR and SSIM "
        f"compare each image with its source where the task keeps it ({where}); CLIP "
        "directional similarity compares the edit with the change from the source's caption "
        "to the prompt, where the source has a caption."
    ]
    table = None
    effects = run.effects
    if effects is not None and (effects["axis"] == "strength").any():
        at = effects[effects["axis"] == "strength"]
        rows: dict[str, dict[str, str]] = {}
        for metric in (m for m in STRENGTH_METRICS if run.has_metric(m)):
            score = metric.headline
            for r in at[at["column"] == score.column].itertuples():
                cell = {score.column: r.mean, f"{score.column}_low": r.low}
                cell[f"{score.column}_high"] = r.high
                rows.setdefault(f"{float(r.level):g}", {})[score.header] = score.cell(cell)
        table = pd.DataFrame([{"strength": k, **v} for k, v in rows.items()])
        lines.append(
            "Per strength: each metric's mean over the configurations at that strength, with "
            f"its {percent(at['confidence'])} interval (the main effects of strength)."
        )
    return [Section(f"Image-conditioned task: {run.name}", lines, table)]


def task_figures(runs: list[Run]) -> list[Figure]:
    """Each metric of the edit against strength, and the preservation trade-off, for the runs
    that are image-conditioned."""
    conditioned = [run for run in runs if run.sources]
    swept = [r for r in conditioned if r.has("strength") and r.configs["strength"].nunique() > 1]
    figures = []
    for metric in STRENGTH_METRICS:
        drawn = [run for run in swept if run.has_metric(metric)]
        if drawn:
            confidence = percent([run.metrics.suite.bootstrap.confidence for run in drawn])
            caption = (
                f"{metric.label} vs strength: a line per scheduler, steps and guidance, each "
                f"shifted a little sideways so that equal values stay visible; bars are "
                f"{confidence} intervals."
            )
            figure = versus_figure(drawn, metric, "strength")
            figures.append(encode_figure(figure, f"{metric.name}_vs_strength.png", caption))
    x, y = PRESERVATION_TRADEOFF
    traded = [
        run for run in conditioned if len(run.configs) > 1 and run.has(x.headline.column)
        and run.has(y.headline.column)
    ]  # fmt: skip
    if traded:
        caption = (
            f"Preservation against alignment: {y.label} against {x.label}, colored by cost; "
            "each configuration is numbered and named in the key (* on the Pareto front)."
        )
        figure = tradeoff_figure(traded, PRESERVATION_TRADEOFF)
        figures.append(encode_figure(figure, "preservation_tradeoff.png", caption))
    return figures


def source_galleries(run: Run, named: bool, prompts: int | Sequence[str]) -> list[Gallery]:
    """Per chosen prompt with a source, the source and image 0 of every configuration."""
    if not run.sources:
        return []
    location = run.out.path(SOURCES)
    with run.out.fs.open(location, "rb") as f:
        ids = sorted(pd.read_parquet(f, columns=["prompt_id"])["prompt_id"])
    # listed prompt ids without a source are the image grids' to show (and check), not these
    wanted = prompts if isinstance(prompts, int) else [p for p in prompts if p in set(ids)]
    chosen = choose_prompts(ids, wanted, run.name)
    if not chosen:
        return []
    dataset = image_dataset(run)
    where = (pads.field("sample_index") == 0) & pads.field("source_id").isin(chosen)
    images = read_images(dataset, where, ["source_id", "task", "outpaint"])
    sources = read_sources(run.out.location + "/" + SOURCES, chosen)
    configs = list(run.configs["config_id"])
    columns = ["source", *(_column(row) for _, row in run.configs.iterrows())]
    rows, cells = [], {}
    for i, source_id in enumerate(chosen):
        image, mask, caption = sources[source_id]
        mine = images[images["source_id"] == source_id]
        inpainted = (mine["task"] == "inpaint").any() and mask is not None
        cells[i, 0] = _outlined(image, mask if inpainted else None)
        for r in mine.itertuples():
            if r.config_id in configs:
                cells[i, 1 + configs.index(r.config_id)] = _result(r.image["bytes"], r.outpaint)
        text = mine["prompt"].iloc[0] if len(mine) else ""
        rows.append(f"{source_id}\n{text}" + (f"\nfrom: {caption}" if caption else ""))
    suffix, prefix = (f": {run.name}", f"{run.name}-") if named else ("", "")
    lines = [
        f"{len(chosen)} of {len(ids)} sources; choose with `--prompts N` or `--prompts ID,ID`. "
        "Rows: a source's prompt id, the prompt, and the source's caption where it has one. "
        "Columns: the source as the pipeline got it, then image 0 of every configuration "
        "(the same seed in each). In magenta: the inpainting mask's outline on the source, "
        "and in an outpainted image the original canvas, the rest being new."
    ]
    figure = Figure(
        f"{prefix}sources.png", "source | result" + suffix, table_png(rows, columns, cells)
    )
    return [Gallery("Sources and results" + suffix, lines, [figure])]


def _tasks(run: Run) -> list[str]:
    table = image_dataset(run).to_table(columns=["task"])
    return sorted(set(table["task"].to_pylist()) - {None})


def _column(row: pd.Series) -> str:
    """A configuration's column header: its strength or expansion first, then its sampling."""
    first = []
    if pd.notna(row.get("strength")):
        first.append(f"strength {row['strength']:g}")
    if pd.notna(row.get("outpaint")):
        first.append(str(row["outpaint"]))
    sampling = f"{row['scheduler']} s{row['num_inference_steps']} g{row['guidance_scale']:g}"
    return "\n".join([*first, sampling])


def _result(blob: bytes, outpaint: str | None) -> bytes:
    """An image, the original canvas framed when it was outpainted (`outpaint`: the row's)."""
    if outpaint is None or pd.isna(outpaint):
        return blob
    image = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
    border = Expansion.parse(outpaint)
    canvas = np.zeros(image.shape[:2], bool)
    canvas[
        border.top : image.shape[0] - border.bottom, border.left : image.shape[1] - border.right
    ] = True
    return _outlined(image, canvas)


def _outlined(image: np.ndarray, inside: np.ndarray | None) -> bytes:
    """The image as a PNG, enlarged pixel by pixel to about a gallery cell, with the border of
    `inside` (H x W bool; None: none) drawn over it one pixel wide; the image's own edge is
    not a border."""
    k = max(1, MAX_CELL // image.shape[1])
    big = image.repeat(k, axis=0).repeat(k, axis=1)
    if inside is not None:
        region = inside.repeat(k, axis=0).repeat(k, axis=1)
        p = np.pad(region, 1, constant_values=True)
        interior = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
        big = big.copy()
        big[region & ~interior] = OUTLINE
    buffer = io.BytesIO()
    Image.fromarray(big).save(buffer, format="PNG")
    return buffer.getvalue()
