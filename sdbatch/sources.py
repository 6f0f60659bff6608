"""Source images of the image-conditioned tasks: read from the prompt file's columns, checked, and
brought to the configuration's size, before Ray starts; and `sources.parquet`, their record.

A cell of `prompts.image_column` (or of the mask and depth columns) is an image struct
{bytes, path}, the format of sdbatch's own output, so one run's images feed the next; or a path
or URI (any fsspec location), taken relative to the prompt file's folder (to the folder itself
when `prompts.path` is a Parquet folder). A struct without bytes is read from its path the same way.

Size policy: an image of another size than the configuration's (height, width) is scaled, keeping
its aspect ratio, until it covers that size (bicubic; a mask: nearest), then center-cropped to it.
An image already at that size is used as it is, pixel for pixel.

Masks are white where the model repaints. A mask must be as large as its image and binary:
every pixel, as 8-bit grey, at most `MASK_BLACK` (kept) or at least `MASK_WHITE` (repainted),
so that a JPEG's or a resize's soft edge passes but a grey or photographic "mask" does not.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from sdbatch.errors import InputError, first_line
from sdbatch.spec import PromptSource

MASK_BLACK = 8
MASK_WHITE = 247
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SOURCES_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("image", IMAGE_STRUCT),  # the source after the size policy: what the pipeline got
        ("mask", IMAGE_STRUCT),  # "L", 255 = repaint; null where none (outpaint: the border)
        ("depth", IMAGE_STRUCT),  # "L", brighter = nearer; null where the estimator runs
        ("source_prompt", pa.string()),
        ("source_sha256", pa.string()),
    ]
)
# The prompt source's fields that name these columns, by the column sdbatch gives each.
COLUMNS = {
    "image": "image_column",
    "mask": "mask_column",
    "depth": "depth_column",
    "source_prompt": "source_prompt_column",
}


@dataclass(frozen=True)
class Source:
    """One prompt row's inputs after the size policy, as lossless PNGs: what the pipeline gets."""

    image: bytes  # RGB
    # "sha256:<hex>" of the image's pixels (H x W x 3 uint8, row-major): the same whatever PNG
    # encoder wrote it, so a resume on other library versions still matches
    sha256: str
    mask: bytes | None = None  # "L": 0 keep, 255 repaint
    depth: bytes | None = None  # "L"
    source_prompt: str | None = None


def pixels(png: bytes) -> np.ndarray:
    """A PNG's pixels: H x W x 3 for RGB, H x W for "L"."""
    return np.asarray(Image.open(io.BytesIO(png)))


def load_sources(
    source: PromptSource, columns: pd.DataFrame, height: int, width: int
) -> dict[str, Source]:
    """Each prompt row's source, mask, depth and source caption, checked and at (height, width).

    Args:
        columns: prompt_id and the prompt file's columns `COLUMNS` names (those the spec sets),
            one row per prompt kept.

    A depth column must give every row a depth map: a batch runs the model's depth estimator
    for all of its images or none.

    Raises:
        InputError: an image is missing or does not decode, a mask or depth map is not the size
            of its image, a mask is not binary, a depth map is flat, a caption is not text.
    """
    base = _base(source.path)
    sources = {}
    for row in columns.to_dict("records"):
        pid = row["prompt_id"]
        image = _open(row["image"], base, "image_column", pid).convert("RGB")
        mask = depth = None
        if "mask" in row:
            grey = _open(row["mask"], base, "mask_column", pid)
            mask = _binary(_same_size(grey, image, "mask_column", pid), pid)
            mask = _png(fit(mask, height, width, Image.Resampling.NEAREST))
        if "depth" in row:
            grey = _open(row["depth"], base, "depth_column", pid)
            grey = _same_size(grey, image, "depth_column", pid)
            depth = fit(grey, height, width, Image.Resampling.BICUBIC)
            if np.ptp(np.asarray(depth)) == 0:
                raise InputError(
                    f"prompts.depth_column: the depth map of prompt {pid} is flat; "
                    "depth2img scales a depth map by its range"
                )
            depth = _png(depth)
        caption = row.get("source_prompt")
        if caption is not None and not isinstance(caption, str):
            raise InputError(f"prompts.source_prompt_column: prompt {pid}'s caption is not text")
        image = fit(image, height, width, Image.Resampling.BICUBIC)
        digest = "sha256:" + hashlib.sha256(np.asarray(image).tobytes()).hexdigest()
        sources[pid] = Source(_png(image), digest, mask, depth, caption)
    return sources


def fit(image: Image.Image, height: int, width: int, resample: Image.Resampling) -> Image.Image:
    """The size policy: scale to cover (height, width), keeping the aspect ratio, then center-crop;
    an image of that size is returned as it is."""
    if image.size == (width, height):
        return image
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, resample)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def sources_table(sources: dict[str, Source]) -> pa.Table:
    """`sources.parquet`: a row per prompt with a source, in `SOURCES_SCHEMA`."""

    def cell(png: bytes | None, pid: str, kind: str) -> dict[str, Any] | None:
        return None if png is None else {"bytes": png, "path": f"{kind}/{pid}.png"}

    rows = [
        {
            "prompt_id": pid,
            "image": cell(s.image, pid, "image"),
            "mask": cell(s.mask, pid, "mask"),
            "depth": cell(s.depth, pid, "depth"),
            "source_prompt": s.source_prompt,
            "source_sha256": s.sha256,
        }
        for pid, s in sources.items()
    ]
    return pa.Table.from_pylist(rows, SOURCES_SCHEMA)


def changed_sources(table: pa.Table, sources: dict[str, Source]) -> list[str]:
    """Ids of prompts in a written `sources.parquet` whose source, mask, depth map or caption
    differ (by pixels) from `sources`; prompts only one of them has are not compared."""
    changed = []
    for row in table.to_pylist():
        new = sources.get(row["prompt_id"])
        if new is None:
            continue
        same = row["source_sha256"] == new.sha256 and row["source_prompt"] == new.source_prompt
        for kind in ("mask", "depth"):
            old_png, new_png = row[kind] and row[kind]["bytes"], getattr(new, kind)
            if (old_png is None) != (new_png is None) or (
                old_png is not None and not np.array_equal(pixels(old_png), pixels(new_png))
            ):
                same = False
        if not same:
            changed.append(row["prompt_id"])
    return changed


def _base(path: str) -> str:
    """The folder that relative image paths are taken from."""
    fs, local = fsspec.core.url_to_fs(path)
    return path if fs.isdir(local) else posixpath.dirname(path.rstrip("/"))


def _open(value: Any, base: str, field: str, pid: str) -> Image.Image:
    """Decode one cell: an image struct, PNG/JPEG bytes, or a path or URI."""
    where = f"prompts.{field}: the image of prompt {pid}"
    if isinstance(value, dict) and value.get("bytes") is None:
        value = value.get("path")
    try:
        if isinstance(value, dict):
            blob = value["bytes"]
        elif isinstance(value, bytes):
            blob = value
        elif isinstance(value, str) and value.strip():
            location = value if "://" in value or value.startswith("/") else f"{base}/{value}"
            with fsspec.open(location, "rb") as f:
                blob = f.read()
        else:
            raise InputError(f"{where} is missing; give an image {{bytes, path}} or a path")
        image = Image.open(io.BytesIO(blob))
        image.load()
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise InputError(f"{where} does not decode ({first_line(e)})") from None
    return image


def _same_size(image: Image.Image, of: Image.Image, field: str, pid: str) -> Image.Image:
    if image.size != of.size:
        raise InputError(
            f"prompts.{field}: prompt {pid}'s {field.removesuffix('_column')} is "
            f"{image.width}x{image.height}, its image "
            f"{of.width}x{of.height}; they must be the same size"
        )
    return image.convert("L")


def _binary(mask: Image.Image, pid: str) -> Image.Image:
    grey = np.asarray(mask)
    soft = int(((grey > MASK_BLACK) & (grey < MASK_WHITE)).sum())
    if soft:
        raise InputError(
            f"prompts.mask_column: the mask of prompt {pid} is not binary ({soft} pixels between "
            f"{MASK_BLACK + 1} and {MASK_WHITE - 1}); use black (<= {MASK_BLACK}) to keep and "
            f"white (>= {MASK_WHITE}) to repaint"
        )
    return Image.fromarray(np.where(grey >= MASK_WHITE, 255, 0).astype(np.uint8))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
