"""The source images of an image-conditioned run (img2img, inpaint, outpaint, depth2img), as the
preservation and directional metrics read them: OUT/sources.parquet joined to the generated rows
(a row's `source_id` is a source row's `prompt_id`), and the part of each result that should keep
its source.

What should be kept: for inpaint the pixels the mask leaves alone (mask 0); for outpaint the
original canvas, which lies at (top, left) of the extended result (the row's `outpaint`,
"t0-r16-b0-l0"); for img2img and depth2img the whole image.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from sdbatch.spec import Expansion

# The generated rows' columns that say what each image was made from.
SOURCE_COLUMNS = ("source_id", "task", "outpaint")
# A mask pixel at or above this is repainted: sources hold binary "L" masks (0 or 255).
MASK_THRESHOLD = 128


@dataclass(frozen=True)
class Source:
    """What one generated image was made from, and where that source lies in it."""

    source_id: str
    image: np.ndarray  # H x W x 3 uint8, exactly as the pipeline got it
    prompt: str | None  # the source's caption (source_prompt), if given
    repaint: np.ndarray | None = None  # H x W bool, True where inpaint repainted
    top: int = 0  # where the source's canvas begins in the result (outpaint)
    left: int = 0

    def preserved(self, result: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The result's part that should keep the source, the source, and the pixels that count
        (H x W bool; None: all)."""
        height, width = self.image.shape[:2]
        part = result[self.top : self.top + height, self.left : self.left + width]
        if part.shape != self.image.shape:
            raise ValueError(
                f"source {self.source_id}: {width}x{height} does not fit the result "
                f"{result.shape[1]}x{result.shape[0]} at top {self.top}, left {self.left}"
            )
        return part, self.image, None if self.repaint is None else ~self.repaint


def row_sources(location: str, columns: dict[str, list[Any]]) -> list[Source | None]:
    """Per generated row (`columns`: its SOURCE_COLUMNS), what it was made from; None for a row
    without a source. Reads only the source rows these rows name from `location`."""
    ids = sorted({i for i in columns["source_id"] if i is not None})
    rows = read_sources(location, ids)
    sources: list[Source | None] = []
    for source_id, task, outpaint in zip(*(columns[c] for c in SOURCE_COLUMNS), strict=True):
        if source_id is None:
            sources.append(None)
            continue
        if source_id not in rows:
            raise ValueError(f"source_id {source_id}: no such prompt_id in {location}")
        image, mask, prompt = rows[source_id]
        top = left = 0
        if outpaint:
            border = Expansion.parse(outpaint)
            top, left = border.top, border.left
        repaint = mask if task == "inpaint" else None
        sources.append(Source(source_id, image, prompt, repaint, top, left))
    return sources


def read_sources(
    location: str, ids: list[str]
) -> dict[str, tuple[np.ndarray, np.ndarray | None, str | None]]:
    """The source rows `ids` of a sources.parquet: prompt_id -> (image H x W x 3 uint8, mask
    H x W bool (True: repaint) or None, source prompt or None)."""
    if not ids:
        return {}
    with fsspec.open(location, "rb") as f:
        table = pq.read_table(
            f, columns=["prompt_id", "image", "mask", "source_prompt"],
            filters=[("prompt_id", "in", ids)],
        )  # fmt: skip
    rows = {}
    for row in table.to_pylist():
        image = np.asarray(_decode(row["image"]).convert("RGB"))
        mask = None
        if row["mask"] is not None:
            mask = np.asarray(_decode(row["mask"]).convert("L")) >= MASK_THRESHOLD
        rows[row["prompt_id"]] = (image, mask, row["source_prompt"])
    return rows


def _decode(cell: dict[str, Any]) -> Image.Image:
    return Image.open(io.BytesIO(cell["bytes"]))
