"""Reading a shard's images: from a generated unit's Parquet file (with the columns that say what
made each image) or from reference image files, and decoding them to H x W x 3 uint8 arrays."""

from __future__ import annotations

import io
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from sdbatch.evaluation.shards import FeatureUnit
from sdbatch.evaluation.sources import SOURCE_COLUMNS
from sdbatch.image_rows import KEY_COLUMNS


def read_unit(unit: FeatureUnit) -> tuple[list[bytes], dict[str, list[Any]]]:
    """A unit's encoded images (`decode_image` turns each into an array) and, for generated
    ones, the columns of each: its key and its prompt, and what it was made from when the unit
    has `sources`."""
    keys: dict[str, list[Any]] = {}
    if len(unit.files) == 1 and unit.files[0].endswith(".parquet"):
        columns = ["image"]
        if unit.generated:
            columns += [*KEY_COLUMNS, "prompt"]
        if unit.sources:
            columns += SOURCE_COLUMNS
        with fsspec.open(unit.files[0], "rb") as f:
            parquet = pq.ParquetFile(f)
            groups = unit.row_groups or range(parquet.num_row_groups)
            table = parquet.read_row_groups(list(groups), columns=columns)
        blobs = [cell["bytes"] for cell in table.column("image").to_pylist()]
        keys = {name: table.column(name).to_pylist() for name in columns[1:]}
    else:
        blobs = [fsspec.open(path, "rb").open().read() for path in unit.files]
    # A reference `limit` can end inside a row group.
    return blobs[: unit.num_images], keys


def decode_image(blob: bytes, resolution: int | None) -> np.ndarray:
    """An encoded image as an H x W x 3 uint8 array; given a `resolution` (reference images),
    resized and center-cropped to it."""
    image = Image.open(io.BytesIO(blob)).convert("RGB")
    if resolution is not None:
        # Short side to `resolution` (bicubic, antialiased when shrinking), then a center crop.
        scale = resolution / min(image.size)
        size = (
            max(resolution, round(image.width * scale)),
            max(resolution, round(image.height * scale)),
        )
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    return np.asarray(image)
