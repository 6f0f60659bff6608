"""Gathering the shards of an output: per-image rows, per-configuration statistics merged over
shards, and each unit's features and CLIP embeddings, with the suite's `safety` policy applied
where they merge."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from sdbatch.evaluation.metric_math import FeatureStats, merge_stats
from sdbatch.evaluation.shards import CLIP_EMBEDDINGS, read_shard, shard_stats
from sdbatch.image_rows import KEY_COLUMNS
from sdbatch.output import Output
from sdbatch.records import UnitMarker


@dataclass(frozen=True)
class Gathered:
    """Every shard of an output, read back.

    `images` has one row per image: its key, `nsfw_flagged`, the per-image metric columns, and,
    for internal use, `_excluded` (left out under the safety policy), `_unit` and `_row` (where
    its features and embeddings are in `features` and `clip_embeddings`).
    """

    images: pd.DataFrame
    stats: dict[str, FeatureStats]  # per config, over the images that count
    features: dict[str, np.ndarray]  # per unit
    clip_embeddings: dict[str, np.ndarray] = field(default_factory=dict)  # per unit, when kept

    def features_of(self, images: pd.DataFrame, dim: int) -> np.ndarray:
        """The feature vectors of these rows of `images`, unit by unit."""
        return _rows_of(self.features, images, dim)

    def clip_embeddings_of(self, images: pd.DataFrame) -> np.ndarray:
        """The CLIP image embeddings of these rows of `images`, unit by unit."""
        dim = next((e.shape[1] for e in self.clip_embeddings.values()), 0)
        return _rows_of(self.clip_embeddings, images, dim)


def _rows_of(arrays: dict[str, np.ndarray], images: pd.DataFrame, dim: int) -> np.ndarray:
    groups = images.groupby("_unit", sort=False)
    parts = [arrays[unit][group["_row"].to_numpy()] for unit, group in groups]
    # (0, dim) when every image of the configuration was excluded
    return np.concatenate(parts) if parts else np.empty((0, dim))


def gather(
    out: Output,
    shard_dir: str,
    markers: list[UnitMarker],
    results: dict[str, Any],
    image_columns: tuple[str, ...],
    safety: str,
) -> Gathered:
    """Read every marked unit's shard.

    Units extracted by this call bring their statistics from the actors; earlier ones are
    recomputed from their shard's features, which is what the actor computed from them. Under
    `safety: exclude` the images the safety checker flagged are left out here, where statistics
    merge: shards hold every image, so changing the policy extracts nothing again.
    """
    per_config, features, embeddings = {}, {}, {}
    # Columns gathered unit by unit and made a frame once: a frame per unit costs more than its
    # shard at thousands of units.
    columns: dict[str, list[Any]] = {name: [] for name in (*KEY_COLUMNS, *image_columns)}
    flags, exclusions, units = [], [], []
    for marker in markers:
        shard = read_shard(f"{out.location}/{shard_dir}/{marker.unit_id}.npz")
        flagged = _flags(out, marker)
        if safety == "exclude":
            excluded = flagged.fillna(False).to_numpy(bool)
        else:
            excluded = np.zeros(len(flagged), bool)
        unit_stats = (results.get(marker.unit_id) or {}).get("stats")
        if unit_stats is None or excluded.any():
            unit_stats = shard_stats(shard, ~excluded)
        for config_id, s in unit_stats.items():
            per_config.setdefault(config_id, []).append(s)
        # The shard lists the unit's images in the order of its Parquet file; pending_units
        # extracts again a shard without every image column.
        for name, parts in columns.items():
            parts.append(shard[name])
        flags.append(flagged)
        exclusions.append(excluded)
        units.append(marker.unit_id)
        if "features" in shard:
            features[marker.unit_id] = shard["features"]
        if CLIP_EMBEDDINGS in shard:
            embeddings[marker.unit_id] = shard[CLIP_EMBEDDINGS]
    counts = [len(f) for f in flags]
    images = pd.DataFrame({k: np.concatenate(columns[k]) for k in KEY_COLUMNS}).astype(
        {"prompt_id": str, "config_id": str, "sample_index": "int32"}
    )
    images["nsfw_flagged"] = pd.concat(flags, ignore_index=True)
    images["_excluded"] = np.concatenate(exclusions)
    for name in image_columns:
        images[name] = np.concatenate(columns[name])
    images["_row"] = np.concatenate([np.arange(n) for n in counts])
    images["_unit"] = np.repeat(units, counts)
    merged = {c: merge_stats(s) for c, s in per_config.items()}
    return Gathered(images, merged, features, embeddings)


def _flags(out: Output, marker: UnitMarker) -> pd.Series:
    """A unit's nsfw_flagged column; all null for images generated before sdbatch recorded it
    (their model is treated as having no safety checker)."""
    with out.fs.open(out.path(marker.file), "rb") as f:
        parquet = pq.ParquetFile(f)
        if "nsfw_flagged" not in parquet.schema_arrow.names:
            return pd.Series([None] * marker.images, dtype="boolean")
        column = parquet.read(columns=["nsfw_flagged"]).column(0)
    return pd.Series(column.to_pylist(), dtype="boolean")
