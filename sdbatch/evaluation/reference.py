"""Reference sets: the real images FID and KID compare against, as cached statistics.

A reference is real images (a Parquet file or folder with an `image` column like sdbatch's own
output, or a folder of image files) or precomputed statistics in the `.npz` format pytorch-fid and
clean-fid use (arrays `mu` and `sigma`). Statistics computed from images are cached under a name
that encodes everything they depend on: the feature extractor, its weights hash, the resize mode,
the resolution and the dataset's hash. A change to any of them is a different file, so a stale
one is never picked up.

The `.npz` files sdbatch writes hold `mu` and `sigma` (float64, readable by pytorch-fid and
clean-fid) plus `count`, `features` (float32, for KID) and `meta` (JSON provenance).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq

from sdbatch.errors import InputError
from sdbatch.evaluation.extractors import ExtractorInfo
from sdbatch.evaluation.metric_math import merge_stats
from sdbatch.evaluation.shards import FeatureUnit, read_npz, shard_stats, write_npz
from sdbatch.spec import MAX_SIDE
from sdbatch.typed_data import conform, require, within

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
IMAGES_PER_UNIT = 256


@dataclass(frozen=True)
class ReferenceSource:
    """The real images FID compares against, or their precomputed statistics (`reference:`)."""

    images: str | None = None  # a Parquet file/folder with an `image` column, or an image folder
    stats: str | None = None  # a .npz with mu and sigma (pytorch-fid / clean-fid format)
    # Reference images are resized (short side, bicubic) and center-cropped to this many pixels
    # before feature extraction; null keeps them as stored.
    resolution: int | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        conform(self)
        require(
            (self.images is None) != (self.stats is None),
            "images",
            "give exactly one of images (real images) or stats (a .npz with mu and sigma)",
        )
        if self.resolution is not None:
            within(self.resolution, 8, MAX_SIDE, "resolution")
        require(self.limit is None or self.limit >= 2, "limit", "must be >= 2 or null")


@dataclass
class ReferenceStats:
    """A reference's Gaussian (mu, sigma), and its features when they are known (for KID)."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    features: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return len(self.mu)

    @property
    def digest(self) -> str:
        """sha256 of mu and sigma: what an FID number was computed against."""
        h = hashlib.sha256(np.ascontiguousarray(self.mu, dtype=np.float64).tobytes())
        h.update(np.ascontiguousarray(self.sigma, dtype=np.float64).tobytes())
        return f"sha256:{h.hexdigest()}"


def save_stats(location: str, stats: ReferenceStats) -> None:
    """Write `stats` as .npz (mu, sigma first: what pytorch-fid and clean-fid read)."""
    arrays: dict[str, Any] = {"mu": stats.mu, "sigma": stats.sigma, "count": stats.count}
    if stats.features is not None:
        arrays["features"] = stats.features.astype(np.float32)
    arrays["meta"] = np.array(json.dumps(stats.meta, sort_keys=True))
    write_npz(location, arrays)


def load_stats(location: str, field_name: str = "reference.stats") -> ReferenceStats:
    """Read a .npz with `mu` and `sigma` (sdbatch's, pytorch-fid's or clean-fid's)."""
    try:
        arrays = read_npz(location)
    except (OSError, ValueError) as e:
        raise InputError(f"{field_name}: cannot read {location} as .npz ({e})") from None
    if "mu" not in arrays or "sigma" not in arrays:
        raise InputError(f"{field_name}: {location} has no mu and sigma arrays")
    mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise InputError(
            f"{field_name}: {location} has mu {mu.shape} and sigma {sigma.shape}; "
            "need (d,) and (d, d)"
        )
    meta = json.loads(str(arrays["meta"])) if "meta" in arrays else {}
    count = int(arrays["count"]) if "count" in arrays else 0
    return ReferenceStats(mu, sigma, count, arrays.get("features"), meta)


@dataclass
class ReferencePlan:
    """Where a suite's reference statistics come from: ready, or units to extract first (on the
    actors, like generated shards), which `statistics` then merges and caches."""

    label: str
    stats: ReferenceStats | None  # loaded from the cache or a given .npz
    units: list[FeatureUnit]
    cache: str | None  # where statistics computed from the units are kept
    meta: dict[str, Any]

    def missing_units(self) -> list[FeatureUnit]:
        """The units whose shard file is not written yet: a crashed extraction resumes."""
        if not self.units:
            return []
        # Every shard sits in one folder; a few hundred images per unit makes one check each cheap.
        fs, _ = fsspec.core.url_to_fs(self.units[0].destination)
        return [u for u in self.units if not fs.exists(u.destination)]

    def statistics(self) -> ReferenceStats:
        """The statistics: as given or cached, else merged from the extracted shards (every unit
        extracted by now), then cached, and the shards dropped."""
        if self.stats is None:
            shards = [read_npz(u.destination) for u in self.units]
            merged = merge_stats([shard_stats(s)[""] for s in shards])
            self.stats = ReferenceStats(
                merged.mean(),
                merged.covariance(),
                merged.count,
                np.concatenate([s["features"] for s in shards]),
                {**self.meta, "count": merged.count},
            )
            save_stats(self.cache, self.stats)
            fs, folder = fsspec.core.url_to_fs(self.units[0].destination.rsplit("/", 1)[0])
            fs.rm(folder, recursive=True)
        return self.stats


def plan_reference(source: ReferenceSource, extractor: ExtractorInfo, cache: str) -> ReferencePlan:
    """Find or plan the reference statistics for `extractor`; InputError for a bad reference."""
    if source.stats is not None:
        stats = load_stats(source.stats)
        _check_compatible(stats, extractor, source.stats)
        return ReferencePlan(source.stats, stats, [], None, stats.meta)

    # 1. list the images and hash what they are (names, sizes, and each file's fingerprint)
    fs, root = fsspec.core.url_to_fs(source.images)
    if not fs.exists(root):
        raise InputError(f"reference.images: {source.images} does not exist")
    files = sorted(fs.find(root) if fs.isdir(root) else [root])
    parquet = [f for f in files if f.endswith(".parquet")]
    images = [f for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
    chosen = parquet or images
    if not chosen:
        raise InputError(
            f"reference.images: {source.images} holds no Parquet files and no images "
            f"({', '.join(IMAGE_SUFFIXES)})"
        )
    h = hashlib.sha256()
    for path in chosen:
        h.update(f"{path.removeprefix(root)}|{fs.size(path)}|{fs.ukey(path)}\n".encode())
    dataset_hash = h.hexdigest()
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", root.rstrip("/").rsplit("/", 1)[-1]).strip("_.")

    # 2. the cache file's name says everything the statistics depend on
    resolution = source.resolution or "native"
    limit = source.limit or "all"
    extractor_name = re.sub(r"[^A-Za-z0-9]+", "_", extractor.name)
    # The readable parts are for people; the final hash covers all of it, full identities included.
    h.update(f"{extractor.key}|{resolution}|{limit}".encode())
    name = (
        f"{label}-{extractor_name}-{_short(extractor.weights)}-{extractor.resize}-"
        f"{resolution}-{limit}-{h.hexdigest()[:12]}"
    )
    cache_path = f"{cache.rstrip('/')}/{name}.npz"
    meta = {
        "dataset": source.images,
        "dataset_sha256": dataset_hash,
        "extractor": extractor.name,
        "extractor_weights": extractor.weights,
        "resize": extractor.resize,
        "resolution": source.resolution,
        "limit": source.limit,
    }
    cache_fs, cache_file = fsspec.core.url_to_fs(cache_path)
    if cache_fs.exists(cache_file):
        return ReferencePlan(label, load_stats(cache_path), [], cache_path, meta)

    # 3. not cached: plan the extraction, one unit per Parquet row group or per 256 image files
    units = _plan_units(fs, chosen, bool(parquet), source, f"{cache.rstrip('/')}/{name}.shards")
    if sum(u.num_images for u in units) < 2:
        raise InputError(f"reference.images: {source.images} has fewer than 2 images")
    return ReferencePlan(label, None, units, cache_path, meta)


def _plan_units(
    fs: Any, files: list[str], parquet: bool, source: ReferenceSource, shards: str
) -> list[FeatureUnit]:
    left = source.limit or float("inf")
    units = []
    if parquet:
        for path in files:
            with fs.open(path, "rb") as f:
                metadata = pq.ParquetFile(f).metadata
            if "image" not in metadata.schema.to_arrow_schema().names:
                raise InputError(f"reference.images: {path} has no `image` column")
            for group in range(metadata.num_row_groups):
                count = int(min(metadata.row_group(group).num_rows, left))
                if count <= 0:
                    break
                left -= count
                units.append(((fs.unstrip_protocol(path),), (group,), count))
    else:
        chosen = files[: int(min(len(files), left))]
        for start in range(0, len(chosen), IMAGES_PER_UNIT):
            batch = tuple(fs.unstrip_protocol(p) for p in chosen[start : start + IMAGES_PER_UNIT])
            units.append((batch, None, len(batch)))
    return [
        FeatureUnit(
            unit_id=f"ref-{i:05d}",
            files=unit_files,
            destination=f"{shards}/{i:05d}.npz",
            num_images=count,
            row_groups=groups,
            generated=False,
            resolution=source.resolution,
        )
        for i, (unit_files, groups, count) in enumerate(units)
    ]


def _check_compatible(stats: ReferenceStats, extractor: ExtractorInfo, location: str) -> None:
    if stats.dim != extractor.dim:
        raise InputError(
            f"reference.stats: {location} holds {stats.dim}-d statistics but the extractor "
            f"{extractor.name} gives {extractor.dim}-d features"
        )
    made_with = stats.meta.get("extractor_weights")
    if made_with is not None and (made_with, stats.meta.get("resize")) != (
        extractor.weights,
        extractor.resize,
    ):
        raise InputError(
            f"reference.stats: {location} was computed with {stats.meta.get('extractor')} "
            f"({_short(made_with)}, {stats.meta.get('resize')}); this suite uses "
            f"{extractor.name} ({_short(extractor.weights)}, {extractor.resize})"
        )


def _short(identity: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "", identity.split(":", 1)[-1])[:10]
