"""Shards: the units of evaluation work, and the .npz file each one leaves behind.

A generated work unit's images become one shard of per-image features and scores (named by the
unit, under a folder keyed by everything they depend on); reference images are cut into shards of
a Parquet row group or 256 files. A shard is written whole or not at all, so a rerun extracts only
the missing ones.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

from sdbatch.evaluation.metric_math import FeatureStats
from sdbatch.publish import publish_beside


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


def shard_stats(shard: dict[str, np.ndarray]) -> dict[str, FeatureStats]:
    """A shard's feature statistics per config (one entry, "", for reference shards)."""
    if "features" not in shard:
        return {}
    features = shard["features"]
    if "config_id" not in shard:
        return {"": FeatureStats.of(features)}
    configs = shard["config_id"]
    return {str(c): FeatureStats.of(features[configs == c]) for c in np.unique(configs)}
