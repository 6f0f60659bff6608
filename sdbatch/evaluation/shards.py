"""Shards: the units of evaluation work, and the .npz file each one leaves behind.

A generated work unit's images become one shard of per-image features and scores (named by the
unit, under a folder keyed by everything they depend on); reference images are cut into shards of
a Parquet row group or 256 files. A shard is written whole or not at all, and records the unit it
was extracted from and the keys of its images, so a rerun extracts only the missing ones and
those that are not the unit's shard (damaged, or another unit's file under its name).
"""

from __future__ import annotations

import io
import logging
import zipfile
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq

from sdbatch.errors import JobFailed, first_line
from sdbatch.evaluation.metric_math import FeatureStats
from sdbatch.image_rows import KEY_COLUMNS
from sdbatch.publish import publish_beside

log = logging.getLogger("sdbatch")
SHARDS = "_shards"  # metrics/_shards/KEY/UNIT.npz: a generated unit's shard, under its key
UNIT_ID = "unit_id"  # the array naming the unit a shard was extracted from
REFERENCE_KEY = "image_key"  # a reference shard's row identities: file, row groups, row
# The images' CLIP image embeddings, in generated and reference shards alike, when a metric needs
# them (CMMD); the shard key does not change with them (they depend only on the CLIP model, which
# it names), so shards without them are extracted again by `pending_units`.
CLIP_EMBEDDINGS = "clip_embeddings"


@dataclass(frozen=True)
class FeatureUnit:
    """One shard of evaluation work: a generated unit's file, or a slice of reference images."""

    unit_id: str
    files: tuple[str, ...]  # one Parquet file, or image files
    destination: str  # the shard file (.npz) this unit writes
    num_images: int
    row_groups: tuple[int, ...] | None = None  # a slice of a Parquet reference file
    generated: bool = True  # generated images carry prompts: the metrics score them
    resolution: int | None = None  # reference images: resize and center-crop to this
    # the output's sources.parquet, when a metric compares images with their sources
    sources: str | None = None


def reference_keys(unit: FeatureUnit) -> dict[str, np.ndarray]:
    """A reference unit's image identities, in the order its images are read."""
    if unit.row_groups is None:
        keys = list(unit.files[: unit.num_images])
    else:
        groups = ",".join(map(str, unit.row_groups))
        keys = [f"{unit.files[0]}#{groups}:{row}" for row in range(unit.num_images)]
    return {REFERENCE_KEY: np.asarray(keys)}


def unit_keys(unit: FeatureUnit) -> dict[str, list[Any]]:
    """The keys of the images a unit holds now, as its shard records them: a generated unit's
    (prompt_id, sample_index, config_id), read from its Parquet file, or a reference unit's."""
    if not unit.generated:
        return {name: keys.tolist() for name, keys in reference_keys(unit).items()}
    with fsspec.open(unit.files[0], "rb") as f:
        table = pq.read_table(f, columns=list(KEY_COLUMNS))
    return {name: table.column(name).to_pylist() for name in KEY_COLUMNS}


def pending_units(units: list[FeatureUnit], arrays: tuple[str, ...]) -> list[FeatureUnit]:
    """The units to extract: those without a shard, and those whose shard is not theirs, which
    is logged in one line and deleted (so nothing reads it). A shard is theirs when it reads as
    an .npz that holds `arrays` for exactly the images the unit holds now (only the small key
    arrays are read whole)."""
    todo = []
    for unit in units:
        fs, path = fsspec.core.url_to_fs(unit.destination)
        if not fs.exists(path):
            todo.append(unit)
        elif problem := _shard_problem(fs, path, unit, arrays):
            log.warning(
                "shard %s %s: deleted, extracting unit %s again",
                unit.destination, problem, unit.unit_id,
            )  # fmt: skip
            fs.rm(path)
            todo.append(unit)
    return todo


def _shard_problem(fs: Any, path: str, unit: FeatureUnit, arrays: tuple[str, ...]) -> str | None:
    expected = unit_keys(unit)
    count = len(next(iter(expected.values())))
    try:
        with fs.open(path, "rb") as f, np.load(f, allow_pickle=False) as shard:
            if missing := [a for a in (*arrays, *expected) if a not in shard.files]:
                return f"lacks the arrays {', '.join(missing)}"
            # Shards written before sdbatch recorded the unit are known by their image keys,
            # which are unique in an output.
            if UNIT_ID in shard.files and (held := str(shard[UNIT_ID])) != unit.unit_id:
                return f"holds unit {held}"
            for name, keys in expected.items():
                if (held := shard[name].tolist()) != keys:
                    return _difference(name, held, keys)
            for name in arrays:
                if (rows := _rows(shard, name)) != count:
                    return f"holds {rows} rows of {name} for {count} images"
    except Exception as e:  # whatever fails to read is not a shard that was written whole
        return f"cannot be read ({type(e).__name__}: {first_line(e)})"
    return None


def _difference(name: str, held: list[Any], keys: list[Any]) -> str:
    if len(held) != len(keys):
        return f"holds {len(held)} images, not the unit's {len(keys)}"
    row = next(i for i, (a, b) in enumerate(zip(held, keys, strict=True)) if a != b)
    return f"holds other images than the unit's ({name} {held[row]!r}, not {keys[row]!r})"


def _rows(shard: Any, name: str) -> int:
    # From the array's .npy header: its data, the bulk of a shard, is read when gathered.
    with shard.zip.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        header = np.lib.format.read_array_header_1_0
        if version != (1, 0):
            header = np.lib.format.read_array_header_2_0
        shape, _, _ = header(f)
    return shape[0] if shape else 0


def write_npz(destination: str, arrays: dict[str, Any]) -> None:
    """Publish `arrays` as an .npz at any fsspec location: written under a temporary name first."""

    def write(fs: Any, tmp: str) -> None:
        with fs.open(tmp, "wb") as f:
            np.savez(f, **arrays)

    publish_beside(destination, write)


def read_npz(location: str) -> dict[str, np.ndarray]:
    """Every array of an .npz (no pickles) at any fsspec location."""
    with fsspec.open(location, "rb") as f:
        return dict(np.load(io.BytesIO(f.read()), allow_pickle=False))


def read_shard(location: str) -> dict[str, np.ndarray]:
    """A shard's arrays. Raises JobFailed for bytes that do not match their checksum (which
    `pending_units` leaves unread), after deleting the file so that a rerun extracts it again."""
    try:
        return read_npz(location)
    except zipfile.BadZipFile as e:
        fs, path = fsspec.core.url_to_fs(location)
        fs.rm(path)
        raise JobFailed(
            f"shard {location} is damaged ({first_line(e)}): deleted, a rerun extracts it again"
        ) from None


def shard_stats(
    shard: dict[str, np.ndarray], keep: np.ndarray | None = None
) -> dict[str, FeatureStats]:
    """A shard's feature statistics per config (one entry, "", for reference shards), over the
    images `keep` selects (default: all)."""
    if "features" not in shard:
        return {}
    features = shard["features"] if keep is None else shard["features"][keep]
    if "config_id" not in shard:
        return {"": FeatureStats.of(features)}
    configs = shard["config_id"] if keep is None else shard["config_id"][keep]
    return {str(c): FeatureStats.of(features[configs == c]) for c in np.unique(configs)}
