"""Image grids: for the first few prompts, image 0 of every configuration side by side. Image 0
has the same seed in every configuration, so the differences are the parameters'."""

from __future__ import annotations

import io
from collections.abc import Sequence

import pandas as pd
import pyarrow.dataset as pads
from PIL import Image, ImageDraw

from sdbatch.image_rows import KEY_COLUMNS
from sdbatch.output import IMAGES
from sdbatch.reporting.parts import Figure, Gallery
from sdbatch.reporting.runs import Run

GRID_PROMPTS = 4  # prompts shown in the image grids
GRID_CELL = 128  # pixels per grid image (larger images are scaled down)


def galleries(
    run: Run, named: bool, prompts: int | Sequence[str], prompt: str | None
) -> list[Gallery]:
    """The run's image galleries (see write_report for `prompts` and `prompt`)."""
    title = "Images (same seed across configurations)" + (f": {run.name}" if named else "")
    return [Gallery(title, [], grids(run, named))]


def grids(run: Run, named: bool) -> list[Figure]:
    """For the first few prompts, image 0 (the same seed) of every configuration side by side."""
    dataset = pads.dataset(run.out.path(IMAGES), filesystem=run.out.fs, format="parquet")
    prompt_ids = sorted(set(dataset.to_table(columns=["prompt_id"])["prompt_id"].to_pylist()))
    chosen = prompt_ids[:GRID_PROMPTS]
    table = dataset.to_table(
        columns=["image", "prompt", *KEY_COLUMNS],
        filter=(pads.field("sample_index") == 0) & pads.field("prompt_id").isin(chosen),
    ).to_pandas()
    order = list(run.configs["config_id"])
    labels = {r["config_id"]: _short_label(r) for _, r in run.configs.iterrows()}
    figures = []
    for i, prompt_id in enumerate(chosen):
        rows = table[table["prompt_id"] == prompt_id].set_index("config_id")
        cells = [(labels[c], rows.loc[c, "image"]["bytes"]) for c in order if c in rows.index]
        prompt = rows["prompt"].iloc[0]
        title = f"{prompt_id}: {prompt}" + (f" ({run.name})" if named else "")
        prefix = f"{run.name}-" if named else ""
        figures.append(Figure(f"{prefix}grid-{i}.png", title, _grid_png(cells)))
    return figures


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
