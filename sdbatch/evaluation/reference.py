"""Reference sets: the real images FID, KID and CMMD compare against, as cached statistics.

A reference is real images (a Parquet file or folder with an `image` column like sdbatch's own
output, or a folder of image files) or precomputed statistics in the `.npz` format pytorch-fid and
clean-fid use (arrays `mu` and `sigma`). Statistics computed from images are cached under a name
that encodes everything they depend on: the feature extractor, its weights hash, the resize mode,
the CLIP model when CMMD keeps embeddings, the resolution and the dataset's hash. A change to any
of them is a different file, so a stale one is never picked up.

The `.npz` files sdbatch writes hold `mu` and `sigma` (float64, readable by pytorch-fid and
clean-fid) plus `count`, `features` (float32, for KID) and `meta` (JSON provenance); and, when a
metric needs them (CMMD), `clip_embeddings` (float32), alone when no metric needs features.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import zipfile
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq

from sdbatch.errors import InputError, first_line
from sdbatch.evaluation.extractors import ExtractorInfo
from sdbatch.evaluation.metric_math import merge_stats
from sdbatch.evaluation.shards import (
    CLIP_EMBEDDINGS,
    FeatureUnit,
    pending_units,
    read_npz,
    read_shard,
    shard_stats,
    write_npz,
)
from sdbatch.spec import MAX_SIDE
from sdbatch.typed_data import conform, require, within

log = logging.getLogger("sdbatch")
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
    """A reference's Gaussian (mu, sigma), its features when they are known (for KID), and its
    CLIP image embeddings when a metric needs them (CMMD)."""

    mu: np.ndarray | None  # None: only CLIP embeddings were asked for
    sigma: np.ndarray | None
    count: int
    features: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    clip_embeddings: np.ndarray | None = None
    # What a metric computes from the reference once and reuses for every configuration.
    derived: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def dim(self) -> int:
        return len(self.mu)

    @property
    def digest(self) -> str:
        """sha256 of mu and sigma, then of the CLIP embeddings when kept: what the numbers were
        computed against."""
        h = hashlib.sha256()
        for array in (self.mu, self.sigma):
            if array is not None:
                h.update(np.ascontiguousarray(array, dtype=np.float64).tobytes())
        if self.clip_embeddings is not None:
            h.update(np.ascontiguousarray(self.clip_embeddings, dtype=np.float32).tobytes())
        return f"sha256:{h.hexdigest()}"


def save_stats(location: str, stats: ReferenceStats) -> None:
    """Write `stats` as .npz (mu, sigma first: what pytorch-fid and clean-fid read)."""
    arrays: dict[str, Any] = {}
    if stats.mu is not None:
        arrays.update(mu=stats.mu, sigma=stats.sigma)
    arrays["count"] = stats.count
    if stats.features is not None:
        arrays["features"] = stats.features.astype(np.float32)
    if stats.clip_embeddings is not None:
        arrays[CLIP_EMBEDDINGS] = stats.clip_embeddings.astype(np.float32)
    arrays["meta"] = np.array(json.dumps(stats.meta, sort_keys=True))
    write_npz(location, arrays)


def load_stats(location: str, field_name: str = "reference.stats") -> ReferenceStats:
    """Read a .npz with `mu` and `sigma` (sdbatch's, pytorch-fid's or clean-fid's), or with
    sdbatch's `clip_embeddings` alone."""
    try:
        arrays = read_npz(location)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        reason = first_line(e)
        raise InputError(f"{field_name}: cannot read {location} as .npz ({reason})") from None
    gaussian = "mu" in arrays and "sigma" in arrays
    if not gaussian and CLIP_EMBEDDINGS not in arrays:
        raise InputError(f"{field_name}: {location} has no mu and sigma arrays")
    mu = sigma = None
    if gaussian:
        mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise InputError(
                f"{field_name}: {location} has mu {mu.shape} and sigma {sigma.shape}; "
                "need (d,) and (d, d)"
            )
    meta = json.loads(str(arrays["meta"])) if "meta" in arrays else {}
    count = int(arrays["count"]) if "count" in arrays else 0
    features, embeddings = arrays.get("features"), arrays.get(CLIP_EMBEDDINGS)
    return ReferenceStats(mu, sigma, count, features, meta, embeddings)


@dataclass
class ReferencePlan:
    """Where a suite's reference statistics come from: ready, or units to extract first (on the
    actors, like generated shards), which `statistics` then merges and caches."""

    label: str
    stats: ReferenceStats | None  # loaded from the cache or a given .npz
    units: list[FeatureUnit]
    cache: str | None  # where statistics computed from the units are kept
    meta: dict[str, Any]
    arrays: tuple[str, ...] = ("features",)  # what each unit's shard holds

    def missing_units(self) -> list[FeatureUnit]:
        """The units whose shard is not written yet (a crashed extraction resumes), or is not
        theirs (see shards.pending_units)."""
        return pending_units(self.units, self.arrays)

    def statistics(self) -> ReferenceStats:
        """The statistics: as given or cached, else merged from the extracted shards (every unit
        extracted by now), then cached, and the shards dropped."""
        if self.stats is None:
            shards = [read_shard(u.destination) for u in self.units]
            count = sum(u.num_images for u in self.units)
            mu = sigma = features = embeddings = None
            if "features" in self.arrays:
                merged = merge_stats([shard_stats(s)[""] for s in shards])
                mu, sigma = merged.mean(), merged.covariance()
                features = np.concatenate([s["features"] for s in shards])
            if CLIP_EMBEDDINGS in self.arrays:
                embeddings = np.concatenate([s[CLIP_EMBEDDINGS] for s in shards])
            meta = {**self.meta, "count": count}
            self.stats = ReferenceStats(mu, sigma, count, features, meta, embeddings)
            save_stats(self.cache, self.stats)
            fs, folder = fsspec.core.url_to_fs(self.units[0].destination.rsplit("/", 1)[0])
            fs.rm(folder, recursive=True)
        return self.stats


def plan_reference(
    source: ReferenceSource,
    extractor: ExtractorInfo | None,
    cache: str,
    clip_embeddings: str | None = None,
) -> ReferencePlan:
    """Find or plan the reference statistics for `extractor` (None: no metric needs features),
    with the CLIP image embeddings of the model whose identity is `clip_embeddings` (None: no
    metric needs them); InputError for a bad reference."""
    if source.stats is not None:
        stats = load_stats(source.stats)
        if extractor is not None:
            _check_compatible(stats, extractor, source.stats)
        if clip_embeddings is not None:
            _check_embeddings(stats, clip_embeddings, source.stats)
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
    # The readable parts are for people; the final hash covers all of it, full identities included.
    parts, arrays = [label], []
    if extractor is not None:
        extractor_name = re.sub(r"[^A-Za-z0-9]+", "_", extractor.name)
        parts += [extractor_name, _short(extractor.weights), extractor.resize]
        arrays.append("features")
    h.update(f"{extractor.key if extractor else '-'}|{resolution}|{limit}".encode())
    if clip_embeddings is not None:
        # Named only when kept, so that the caches of suites without CMMD keep their names.
        parts += ["clipemb", _short(clip_embeddings)]
        h.update(f"|{CLIP_EMBEDDINGS}|{clip_embeddings}".encode())
        arrays.append(CLIP_EMBEDDINGS)
    name = "-".join([*parts, str(resolution), str(limit), h.hexdigest()[:12]])
    cache_path = f"{cache.rstrip('/')}/{name}.npz"
    meta = {
        "dataset": source.images,
        "dataset_sha256": dataset_hash,
        "extractor": extractor.name if extractor else None,
        "extractor_weights": extractor.weights if extractor else None,
        "resize": extractor.resize if extractor else None,
        "resolution": source.resolution,
        "limit": source.limit,
    }
    if clip_embeddings is not None:
        meta[CLIP_EMBEDDINGS] = clip_embeddings
    cache_fs, cache_file = fsspec.core.url_to_fs(cache_path)
    if cache_fs.exists(cache_file):
        if (cached := _read_cache(cache_path, meta, extractor)) is not None:
            return ReferencePlan(label, cached, [], cache_path, meta, tuple(arrays))
        cache_fs.rm(cache_file)

    # 3. not cached: plan the extraction, one unit per Parquet row group or per 256 image files
    units = _plan_units(fs, chosen, bool(parquet), source, f"{cache.rstrip('/')}/{name}.shards")
    if sum(u.num_images for u in units) < 2:
        raise InputError(f"reference.images: {source.images} has fewer than 2 images")
    return ReferencePlan(label, None, units, cache_path, meta, tuple(arrays))


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


def _read_cache(
    location: str, meta: dict[str, Any], extractor: ExtractorInfo | None
) -> ReferenceStats | None:
    """The cached statistics, or None for a file that cannot be read or holds the statistics of
    other images or settings (which is logged in one line)."""
    try:
        stats = load_stats(location, "reference cache")
    except InputError as e:
        problem = str(e)
    else:
        # "dataset" is the path as given; the images behind it are dataset_sha256.
        other = [k for k in meta if k != "dataset" and stats.meta.get(k) != meta[k]]
        if extractor is not None and (stats.mu is None or stats.dim != extractor.dim):
            other.append("dimension")
        if not other:
            return stats
        problem = f"reference cache: {location} holds statistics of another {', '.join(other)}"
    log.warning("%s: deleted, computing the reference statistics again", problem)
    return None


def _check_compatible(stats: ReferenceStats, extractor: ExtractorInfo, location: str) -> None:
    if stats.mu is None:
        raise InputError(f"reference.stats: {location} has no mu and sigma arrays")
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


def _check_embeddings(stats: ReferenceStats, clip: str, location: str) -> None:
    if stats.clip_embeddings is None or stats.meta.get(CLIP_EMBEDDINGS) != clip:
        raise InputError(
            f"reference.stats: {location} holds no CLIP image embeddings of this suite's CLIP "
            f"model ({_short(clip)}), which cmmd needs; give reference.images instead"
        )


def _short(identity: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "", identity.split(":", 1)[-1])[:10]
