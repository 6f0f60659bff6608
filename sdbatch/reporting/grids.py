"""Image galleries: for a few prompts, image 0 of every configuration in a table (rows scheduler and
steps, after model and adapter when a run has several; columns guidance); for each ranked metric
with per-image scores, the images the best configuration by it scores worst; and, when asked,
every image of one prompt.

Image 0 has the same seed in every configuration, so a grid's differences are the parameters'.
Every PNG is at most the page's width, so the page shows it at its own size and its labels stay
readable; long prompt text goes in the caption. Only the images shown are read and decoded.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from PIL import Image, ImageDraw, ImageFont

from sdbatch.errors import InputError
from sdbatch.evaluation.metric import Metric
from sdbatch.evaluation.registry import ranked_metrics
from sdbatch.image_rows import KEY_COLUMNS
from sdbatch.output import IMAGES, METRICS_DIR
from sdbatch.reporting.parts import Figure, Gallery
from sdbatch.reporting.runs import MODEL, PARAMS, Run
from sdbatch.reporting.summary import best_by, label
from sdbatch.typed_data import shown

GRID_PROMPTS = 4  # prompts shown in the image grids
WORST_IMAGES = 8  # images shown per metric, worst first
PAGE_WIDTH = 1100  # render.STYLE's max-width: a PNG no wider is shown at its own size
FONT_SIZE = 15  # pixels; at the page's scale of 1, labels read like its 13 px captions
MIN_CELL, MAX_CELL = 96, 160  # an image's side in the table, in pixels
GAP = 4  # white between images, so that neighbours do not merge
PAD = 8


def galleries(
    run: Run, named: bool, prompts: int | Sequence[str], prompt: str | None
) -> list[Gallery]:
    """The run's image galleries (see write_report for `prompts` and `prompt`)."""
    # 1. check the prompt ids against the run before any image is read
    dataset = image_dataset(run)
    ids = sorted(pc.unique(dataset.to_table(columns=["prompt_id"])["prompt_id"]).to_pylist())
    chosen = choose_prompts(ids, prompts, run.name)
    if prompt is not None and prompt not in ids:
        raise InputError(_unknown("--prompt", prompt, ids, run.name))
    suffix, prefix = (f": {run.name}", f"{run.name}-") if named else ("", "")
    # 2. the grids, the worst images by each metric, every image of one prompt
    parts: list[Gallery] = []
    if chosen:
        how = (
            f"{len(chosen)} of {len(ids)} prompts, spread evenly over their sorted ids"
            if isinstance(prompts, int)
            else f"{len(chosen)} of {len(ids)} prompts, as listed"
        )
        lines = [
            f"{how}; choose with `--prompts N` or `--prompts ID,ID`.",
            "Image 0 of each configuration, which has the same seed in every one: the "
            "differences are the parameters'. Rows: "
            + ("model and adapter, " if MODEL in run.configs else "")
            + "scheduler and steps; columns: guidance.",
        ]
        figures = _grids(run, dataset, chosen, named, prefix)
        parts.append(Gallery("Images (same seed across configurations)" + suffix, lines, figures))
    worst = [f for m in ranked_metrics() if (f := _worst_figure(run, dataset, m, prefix))]
    if worst:
        lines = [
            f"For each metric with per-image scores, the {WORST_IMAGES} images that the "
            "configuration best by it scores worst, worst first, with prompt id, sample and "
            "score. An image's score is the mean of the metric's per-image scores (for "
            "attribute accuracy, the share of attributes right)."
        ]
        parts.append(Gallery("Worst images of the best configurations" + suffix, lines, worst))
    if prompt is not None:
        figure = _prompt_figure(run, dataset, prompt, named, prefix)
        title = f"Every image of prompt {prompt}" + suffix
        lines = ["Rows: configurations; columns: samples (sample k has the same seed in each)."]
        parts.append(Gallery(title, lines, [figure]))
    return parts


def choose_prompts(ids: list[str], prompts: int | Sequence[str], run_name: str) -> list[str]:
    """The prompt ids to show: `prompts` of the sorted `ids` spread evenly (the first and the
    last among them), or the ids listed, in their order; InputError for an id not in `ids`."""
    if isinstance(prompts, int):
        if prompts <= 0 or not ids:
            return []
        if prompts >= len(ids):
            return list(ids)
        # evenly from the first to the last: the first N would all come from one end of the set
        return [ids[i] for i in np.linspace(0, len(ids) - 1, prompts).round().astype(int)]
    known = set(ids)
    for prompt_id in prompts:
        if prompt_id not in known:
            raise InputError(_unknown("--prompts", prompt_id, ids, run_name))
    return list(dict.fromkeys(prompts))


def worst_images(run: Run, metric: Metric, count: int = WORST_IMAGES) -> pd.DataFrame | None:
    """The `count` images that the configuration best by `metric` scores worst, worst first: their
    key columns and `score`; None when the run has no per-image scores for it."""
    path = run.out.path(METRICS_DIR, "images.parquet")
    if not (run.has_metric(metric) and metric.image_columns and run.out.fs.exists(path)):
        return None
    scores = pads.dataset(path, filesystem=run.out.fs, format="parquet")
    # The metric's numeric per-image columns (the CLIP score; 1 or 0 per attribute); its flags,
    # such as clip_truncated, are booleans.
    columns = [
        c
        for c in metric.image_columns
        if c in scores.schema.names and pa.types.is_floating(scores.schema.field(c).type)
    ]
    if not columns:
        return None
    best = best_by(run.configs.dropna(subset=[metric.headline.column]), metric)
    table = scores.to_table(
        columns=[*KEY_COLUMNS, "nsfw_flagged", *columns],
        filter=pads.field("config_id") == best["config_id"],
    ).to_pandas()
    if run.metrics.suite.safety == "exclude":
        # the metric left these out: they are not its worst images
        table = table[~table["nsfw_flagged"].fillna(False).astype(bool)]
    table["score"] = table[columns].mean(axis=1)  # NaN where nothing was scored (not a caption)
    table = table.dropna(subset=["score"]).sort_values(
        ["score", "prompt_id", "sample_index"], ascending=[metric.higher_is_better, True, True]
    )
    return table.head(count)[[*KEY_COLUMNS, "score"]].reset_index(drop=True)


def image_dataset(run: Run) -> pads.Dataset:
    """The run's images/ folder as one Parquet dataset (read lazily, filtered by row group)."""
    return pads.dataset(run.out.path(IMAGES), filesystem=run.out.fs, format="parquet")


def _unknown(field: str, value: str, ids: list[str], run_name: str) -> str:
    examples = ", ".join(ids[:3])
    return (
        f"{field}: {shown(value)} is not a prompt id of run {run_name}; it has {len(ids)}, "
        f"e.g. {examples}"
    )


def read_images(
    dataset: pads.Dataset, where: pads.Expression, extra: Sequence[str] = ()
) -> pd.DataFrame:
    """The images matching `where`, with their prompt, key and `extra` columns; Parquet
    statistics skip the row groups that cannot match."""
    columns = ["image", "prompt", *KEY_COLUMNS, *extra]
    return dataset.to_table(columns=columns, filter=where).to_pandas()


def _grids(
    run: Run, dataset: pads.Dataset, chosen: list[str], named: bool, prefix: str
) -> list[Figure]:
    """Per prompt, image 0 of every configuration: rows (model and adapter, scheduler, steps),
    columns guidance."""
    table = read_images(
        dataset, (pads.field("sample_index") == 0) & pads.field("prompt_id").isin(chosen)
    )
    configs = run.configs
    models = configs[MODEL] if MODEL in configs else pd.Series("", index=configs.index)
    row_keys = list(
        dict.fromkeys(
            zip(models, configs["scheduler"], configs["num_inference_steps"], strict=True)
        )
    )
    guidance = sorted(configs["guidance_scale"].unique())
    place = {
        config_id: (row_keys.index((model, scheduler, steps)), guidance.index(g))
        for model, (config_id, scheduler, steps, g) in zip(
            models, configs[["config_id", *PARAMS]].itertuples(False), strict=True
        )
    }
    rows = [
        f"{model}\n{scheduler}\n{steps} steps" if model else f"{scheduler}\n{steps} steps"
        for model, scheduler, steps in row_keys
    ]
    columns = [f"guidance {g:g}" for g in guidance]
    figures = []
    for i, prompt_id in enumerate(chosen):
        mine = table[table["prompt_id"] == prompt_id]
        cells = {
            place[r.config_id]: r.image["bytes"] for r in mine.itertuples() if r.config_id in place
        }
        title = f"{prompt_id}: {mine['prompt'].iloc[0]}" + (f" ({run.name})" if named else "")
        figures.append(Figure(f"{prefix}grid-{i}.png", title, table_png(rows, columns, cells)))
    return figures


def _worst_figure(run: Run, dataset: pads.Dataset, metric: Metric, prefix: str) -> Figure | None:
    worst = worst_images(run, metric)
    if worst is None or worst.empty:
        return None
    config_id = worst["config_id"].iloc[0]
    where = (pads.field("config_id") == config_id) & pads.field("prompt_id").isin(
        list(worst["prompt_id"].unique())
    )
    images = read_images(dataset, where).set_index(["prompt_id", "sample_index"])
    digits = metric.headline.digits
    columns = [
        f"{r.prompt_id}\nsample {r.sample_index}: {r.score:.{digits}f}" for r in worst.itertuples()
    ]
    cells = {
        (0, j): images.loc[(r.prompt_id, r.sample_index), "image"]["bytes"]
        for j, r in enumerate(worst.itertuples())
    }
    texts = images["prompt"].groupby(level="prompt_id").first()
    best = run.configs.set_index("config_id").loc[config_id]
    title = (
        f"{metric.label}, worst first, of {label(best)} ({config_id}), the best by "
        f"{metric.label}: "
        + "; ".join(f"{p}: {texts[p]}" for p in dict.fromkeys(worst["prompt_id"]))
    )
    return Figure(f"{prefix}worst-{metric.name}.png", title, table_png([""], columns, cells))


def _prompt_figure(
    run: Run, dataset: pads.Dataset, prompt: str, named: bool, prefix: str
) -> Figure:
    """Every image of one prompt: rows configurations, columns samples."""
    table = read_images(dataset, pads.field("prompt_id") == prompt)
    order = list(run.configs["config_id"])
    samples = sorted(table["sample_index"].unique())
    cells = {
        (order.index(r.config_id), samples.index(r.sample_index)): r.image["bytes"]
        for r in table.itertuples()
        if r.config_id in order
    }
    rows = [label(row) for _, row in run.configs.iterrows()]
    columns = [f"sample {s}" for s in samples]
    title = f"{prompt}: {table['prompt'].iloc[0]}" + (f" ({run.name})" if named else "")
    return Figure(f"{prefix}prompt.png", title, table_png(rows, columns, cells))


def table_png(rows: list[str], columns: list[str], cells: dict[tuple[int, int], bytes]) -> bytes:
    """Images (PNG bytes at (row, column)) under column headers and beside row headers; columns
    that do not fit the page's width wrap into bands below, each with its headers."""
    font = ImageFont.load_default(size=FONT_SIZE)
    ascent, descent = font.getmetrics()
    line = ascent + descent + 2

    def width(text: str) -> int:
        return int(max(font.getlength(part) for part in text.split("\n")))

    head = min(max(width(r) for r in rows) + 2 * PAD, PAGE_WIDTH // 3) if any(rows) else 0
    # as many columns as fit with their labels whole: a prompt id cut short names nothing
    per_band = (PAGE_WIDTH - head) // max(MIN_CELL, max(width(c) for c in columns) + GAP)
    per_band = max(1, min(len(columns), per_band))
    cell = min(MAX_CELL, (PAGE_WIDTH - head) // per_band - GAP)
    images = {at: _fit(blob, cell) for at, blob in cells.items()}
    cell_height = max((im.height for im in images.values()), default=cell)
    header = max(c.count("\n") + 1 for c in columns) * line + PAD
    bands = -(-len(columns) // per_band)
    band_height = header + len(rows) * (cell_height + GAP)
    sheet = Image.new("RGB", (head + per_band * (cell + GAP) - GAP, bands * band_height), "white")
    draw = ImageDraw.Draw(sheet)
    for band in range(bands):
        top = band * band_height
        for j in range(band * per_band, min(len(columns), (band + 1) * per_band)):
            x = head + (j - band * per_band) * (cell + GAP)
            draw.multiline_text((x, top + PAD // 2), _cut(font, columns[j], cell), "black", font)
            for i in range(len(rows)):
                y = top + header + i * (cell_height + GAP)
                if (i, j) in images:
                    sheet.paste(images[i, j], (x, y))
                else:  # a configuration without this image
                    draw.rectangle((x, y, x + cell - 1, y + cell_height - 1), fill="#eeeeee")
        for i, row in enumerate(rows):
            y = top + header + i * (cell_height + GAP) + cell_height // 2
            text = _cut(font, row, head - 2 * PAD)
            draw.multiline_text((PAD, y), text, "black", font, anchor="lm")
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def _fit(blob: bytes, side: int) -> Image.Image:
    """A PNG decoded and scaled to `side` pixels wide, its aspect kept."""
    image = Image.open(io.BytesIO(blob)).convert("RGB")
    # Small images are enlarged pixel by pixel (no blur to hide detail), large ones filtered.
    shrink = image.width > side
    resample = Image.Resampling.LANCZOS if shrink else Image.Resampling.NEAREST
    return image.resize((side, max(1, round(side * image.height / image.width))), resample)


def _cut(font: ImageFont.FreeTypeFont, text: str, room: int) -> str:
    """Each line of `text` shortened to fit `room` pixels, marked with '...' where cut."""
    lines = []
    for part in text.split("\n"):
        cut = part
        while cut and font.getlength(cut + ("..." if cut != part else "")) > room:
            cut = cut[:-1]
        lines.append(cut if cut == part else cut + "...")
    return "\n".join(lines)
