"""`sdbatch eval`: CLIP score, FID and KID for every sweep configuration of a generated output.

Writes OUT/metrics/:
    configs.parquet, configs.csv   one row per configuration: its parameters, n_images, how many
                                   the safety checker flagged and the suite's `safety` excluded,
                                   clip_score, fid and their bootstrap intervals, kid, seconds per
                                   image
    images.parquet                 one row per image: its flag and CLIP score, joinable to the
                                   images on (prompt_id, sample_index, config_id)
    metrics.json                   provenance: models and their hashes, resize mode, reference
                                   statistics hash, library versions, truncated prompts
    _shards/KEY/UNIT.npz           per-image features and scores of each generated unit; a rerun
                                   (after a crash, or once more images exist) extracts only what
                                   is missing. KEY changes with the CLIP model or extractor.

Example:
    >>> from sdbatch.spec import load_suite
    >>> summary = evaluate("out/demo", load_suite("eval/demo.yaml"))
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sdbatch import distribute
from sdbatch.dataset import METRICS, Output, versions
from sdbatch.errors import InputError, JobFailed
from sdbatch.features import (
    ATTRIBUTES,
    ExtractorInfo,
    FeatureSettings,
    FeatureUnit,
    FeatureWorker,
    describe_extractor,
    read_npz,
    shard_stats,
)
from sdbatch.metrics import (
    FeatureStats,
    FrechetReference,
    fid,
    fid_interval,
    kid,
    mean_interval,
    merge_stats,
)
from sdbatch.pipeline import CLIP, ModelSource, resolve_model
from sdbatch.reference import ReferencePlan, ReferenceStats, finish_reference, plan_reference
from sdbatch.spec import Suite

log = logging.getLogger("sdbatch")
SHARDS = "_shards"
CONFIG_COLUMNS = ("config_id", "scheduler", "num_inference_steps", "guidance_scale")


@dataclass(frozen=True)
class EvalSummary:
    """What an eval call produced."""

    metrics: str  # the metrics folder
    configs: pd.DataFrame  # the per-configuration table
    seconds: float  # the whole call
    extraction_seconds: float = 0.0  # from the first loaded actor to the last shard written


@dataclass(frozen=True)
class EvalInputs:
    """A suite resolved against the machine: models pinned, extractor described, reference found."""

    clip: ModelSource | None
    extractor: ExtractorInfo | None
    reference: ReferencePlan | None


def resolve_suite(suite: Suite) -> EvalInputs:
    """Check a suite's models and reference before any work; raises InputError."""
    wants_clip = "clip_score" in suite.metrics or (
        suite.needs_features and suite.fid.features == "clip"
    )
    clip = resolve_model(suite.clip.model, suite.clip.revision, CLIP) if wants_clip else None
    extractor = describe_extractor(suite.fid, clip) if suite.needs_features else None
    reference = None
    if extractor is not None:
        cache = str(Path(suite.cache).expanduser()) if "://" not in suite.cache else suite.cache
        reference = plan_reference(suite.reference, extractor, cache)
    return EvalInputs(clip, extractor, reference)


def compute_reference(suite: Suite, address: str | None = None) -> str:
    """Compute and cache the suite's reference statistics (if not cached yet); returns the file."""
    inputs = resolve_suite(suite)
    if inputs.reference is None:
        raise InputError("reference: this suite has no FID or KID metric, so no reference")
    plan = inputs.reference
    if plan.stats is None:
        total = sum(u.num_images for u in plan.units)
        todo = plan.missing_units()
        done = total - sum(u.num_images for u in todo)
        settings = dataclasses.replace(_settings(inputs, suite), clip=_clip_for_features(inputs))
        if todo:
            _extract(settings, todo, suite, address, (total, done, "reference"))
        finish_reference(plan)
    return plan.cache or plan.label


def evaluate(
    output: str, suite: Suite, address: str | None = None, inputs: EvalInputs | None = None
) -> EvalSummary:
    """Compute the suite's metrics for every configuration in `output`; resumable.

    Args:
        inputs: the suite already resolved (`resolve_suite`), when the caller checked it early.

    Raises:
        InputError: no generated images, or a bad suite, model or reference; before any work.
        JobFailed: feature extraction broke; finished shards are kept and a rerun resumes.
    """
    began = time.perf_counter()
    # 1. check every input before anything expensive starts
    out = Output(output)
    run = out.read_run()
    if run is None:
        raise InputError(f"OUT: {output} holds no sdbatch run (no run.json); generate first")
    markers = sorted(out.done_units(), key=lambda m: m["unit_id"])
    if not markers or sum(m["images"] for m in markers) == 0:
        raise InputError(f"OUT: {output} has no generated images yet")
    inputs = inputs or resolve_suite(suite)

    # 2. plan: the reference (unless cached) and every generated unit without a shard file
    shard_dir = f"{METRICS}/{SHARDS}/{_shard_key(inputs, suite)}"
    existing = _existing_shards(out, shard_dir)
    units = [
        FeatureUnit(
            unit_id=m["unit_id"],
            files=(f"{out.location}/{m['file']}",),
            destination=f"{out.location}/{shard_dir}/{m['unit_id']}.npz",
            num_images=m["images"],
        )
        for m in markers
        if f"{m['unit_id']}.npz" not in existing
    ]
    reference_units = inputs.reference.missing_units() if inputs.reference else []
    reference_images = sum(u.num_images for u in inputs.reference.units) if inputs.reference else 0
    total = sum(m["images"] for m in markers) + reference_images
    todo = reference_units + units
    log.info(
        "evaluating %s: %d images in %d configurations (%s); %d units to extract",
        out.location, sum(m["images"] for m in markers), len({m["config_id"] for m in markers}),
        ", ".join(suite.metrics), len(todo),
    )  # fmt: skip

    # 3. extract features on Ray actors: reference shards first, then generated ones
    results: dict[str, Any] = {}
    workers: list[dict[str, Any]] = []
    extraction = 0.0
    if todo:
        done = total - sum(u.num_images for u in todo)
        progress = (total, done, "evaluating")
        result = _extract(_settings(inputs, suite), todo, suite, address, progress)
        results, workers, extraction = result.results, result.workers, result.seconds
    reference = None
    if inputs.reference is not None:
        reference = inputs.reference.stats or finish_reference(inputs.reference)

    # 4. merge every shard's statistics per configuration, and compute the metrics
    images, stats, features = _collect(out, shard_dir, markers, results, suite.safety)
    if excluded := int(images["_excluded"].sum()):
        log.info("%d images the safety checker flagged are left out of the metrics", excluded)
    table = _config_table(run, markers, images, stats, features, reference, suite, inputs)

    # 5. write the tables, then metrics.json last: it says the set is complete
    _write_tables(out, table, images)
    record = _provenance(suite, inputs, reference, images, workers, time.perf_counter() - began)
    body = json.dumps(record, indent=2, sort_keys=True, default=_json_default).encode()
    out.put(f"{METRICS}/metrics.json", lambda tmp: out.fs.pipe_file(tmp, body))
    log.info("metrics of %d configurations in %s/%s", len(table), out.location, METRICS)
    seconds = time.perf_counter() - began
    return EvalSummary(f"{out.location}/{METRICS}", table, seconds, extraction)


def _settings(inputs: EvalInputs, suite: Suite) -> FeatureSettings:
    attributes = "attribute_accuracy" in suite.metrics
    return FeatureSettings(inputs.clip, inputs.extractor, suite.runtime.batch_size, attributes)


def _clip_for_features(inputs: EvalInputs) -> ModelSource | None:
    """Reference images need CLIP only when CLIP is the feature extractor (no prompts to score)."""
    return inputs.clip if inputs.extractor and inputs.extractor.name == "clip" else None


def _extract(
    settings: FeatureSettings,
    units: list[FeatureUnit],
    suite: Suite,
    address: str | None,
    progress: tuple[int, int, str],
) -> distribute.RunResult:
    connected = distribute.connect(address)
    try:
        plan = distribute.plan_actors(suite.runtime)
        result = distribute.run_units(
            FeatureWorker, settings, units, plan, progress, suite.runtime.retries
        )
    finally:
        if connected:
            import ray

            ray.shutdown()
    if result.failed:
        # Metrics over a configuration with missing shards would be silently biased.
        unit_id, failure = next(iter(result.failed.items()))
        raise JobFailed(
            f"{len(result.failed)} unit(s) could not be extracted after "
            f"{failure.attempts} attempts, first {unit_id}: {failure.error}"
        )
    return result


def _shard_key(inputs: EvalInputs, suite: Suite) -> str:
    import hashlib

    parts = [inputs.clip.identity if inputs.clip else "-"]
    parts.append(inputs.extractor.key if inputs.extractor else "-")
    parts.append("attributes" if "attribute_accuracy" in suite.metrics else "-")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def _existing_shards(out: Output, shard_dir: str) -> set[str]:
    folder = out.path(shard_dir)
    if not out.fs.exists(folder):
        return set()
    return {p.rsplit("/", 1)[-1] for p in out.fs.ls(folder, detail=False) if p.endswith(".npz")}


def _collect(
    out: Output,
    shard_dir: str,
    markers: list[dict[str, Any]],
    results: dict[str, Any],
    safety: str,
) -> tuple[pd.DataFrame, dict[str, FeatureStats], dict[str, np.ndarray]]:
    """Per-image rows from every shard file, per-config statistics merged over shards, and each
    unit's features (rows of the per-image table point into them through _unit and _row).

    Units extracted by this call bring their statistics from the actors; earlier ones are
    recomputed from their shard's features, which is what the actor computed from them. Under
    `safety: exclude` the images the safety checker flagged are left out here, where statistics
    merge: shards hold every image, so changing the policy extracts nothing again.
    """
    frames, per_config, features = [], {}, {}
    for marker in markers:
        shard = read_npz(f"{out.location}/{shard_dir}/{marker['unit_id']}.npz")
        flagged = _flags(out, marker)
        if safety == "exclude":
            excluded = flagged.fillna(False).to_numpy(bool)
        else:
            excluded = np.zeros(len(flagged), bool)
        unit_stats = (results.get(marker["unit_id"]) or {}).get("stats")
        if unit_stats is None or excluded.any():
            unit_stats = shard_stats({k: v[~excluded] for k, v in shard.items()})
        for config_id, s in unit_stats.items():
            per_config.setdefault(config_id, []).append(s)
        frame = pd.DataFrame(
            {k: shard[k] for k in ("prompt_id", "sample_index", "config_id")}
        ).astype({"prompt_id": str, "config_id": str, "sample_index": "int32"})
        # The shard lists the unit's images in the order of its Parquet file.
        frame["nsfw_flagged"] = flagged
        frame["_excluded"] = excluded
        for name in ("clip_score", "clip_truncated", *(f"{a}_correct" for a in ATTRIBUTES)):
            if name in shard:
                frame[name] = shard[name]
        if "features" in shard:
            frame["_row"] = range(len(frame))
            features[marker["unit_id"]] = shard["features"]
        frame["_unit"] = marker["unit_id"]
        frames.append(frame)
    images = pd.concat(frames, ignore_index=True)
    return images, {c: merge_stats(s) for c, s in per_config.items()}, features


def _flags(out: Output, marker: dict[str, Any]) -> pd.Series:
    """A unit's nsfw_flagged column; all null for images generated before sdbatch recorded it
    (their model is treated as having no safety checker)."""
    with out.fs.open(out.path(marker["file"]), "rb") as f:
        parquet = pq.ParquetFile(f)
        if "nsfw_flagged" not in parquet.schema_arrow.names:
            return pd.Series([None] * marker["images"], dtype="boolean")
        column = parquet.read(columns=["nsfw_flagged"]).column(0)
    return pd.Series(column.to_pylist(), dtype="boolean")


def _config_table(
    run: dict[str, Any],
    markers: list[dict[str, Any]],
    images: pd.DataFrame,
    stats: dict[str, FeatureStats],
    features: dict[str, np.ndarray],
    reference: ReferenceStats | None,
    suite: Suite,
    inputs: EvalInputs,
) -> pd.DataFrame:
    b = suite.bootstrap
    gauss = FrechetReference(reference.mu, reference.sigma) if reference is not None else None
    seconds: dict[str, list[float]] = {}
    for m in markers:
        seconds.setdefault(m["config_id"], [0.0, 0])
        seconds[m["config_id"]][0] += m["generation_seconds"]
        seconds[m["config_id"]][1] += m["images"]
    rows = []
    for config in run["configs"]:
        config_id = config["config_id"]
        generated = images[images["config_id"] == config_id]
        if generated.empty:
            continue  # configured but not generated yet
        mine = generated[~generated["_excluded"]]  # the images the metrics are computed on
        row: dict[str, Any] = {c: config[c] for c in CONFIG_COLUMNS}
        row["n_images"] = len(generated)
        checked = generated["nsfw_flagged"].dropna()
        # null where no image went through a safety checker, so "none flagged" means checked
        row["n_flagged"] = int(checked.sum()) if len(checked) else None
        row["n_excluded"] = len(generated) - len(mine)
        spent, count = seconds[config_id]
        row["seconds_per_image"] = spent / count
        if "clip_score" in suite.metrics:
            scores = mine["clip_score"].to_numpy()
            row["clip_score"] = float(scores.mean()) if len(scores) else float("nan")
            row["clip_score_low"], row["clip_score_high"] = mean_interval(
                scores, b.samples, b.confidence, b.seed
            )
        if "attribute_accuracy" in suite.metrics:
            for attribute in ATTRIBUTES:
                judged = mine[f"{attribute}_correct"].dropna().to_numpy()
                name = f"{attribute}_accuracy"
                row[name] = float(judged.mean()) if len(judged) else float("nan")
                row[f"{name}_low"], row[f"{name}_high"] = mean_interval(
                    judged, b.samples, b.confidence, b.seed
                )
        feats = _features_of(features, mine, gauss.dim) if gauss is not None else None
        if "fid" in suite.metrics:
            n, dim = len(mine), inputs.extractor.dim
            row["fid"] = fid(stats[config_id], gauss) if n >= 2 else float("nan")
            row["fid_low"], row["fid_high"] = fid_interval(
                feats, gauss, b.samples, b.confidence, b.seed
            )
            row["fid_ill_conditioned"] = n < dim
            if n < dim:
                log.warning(
                    "%s: %d images < %d feature dimensions: FID is biased upwards and "
                    "ill-conditioned; compare it only at equal n, or use KID",
                    config_id, n, dim,
                )  # fmt: skip
        if "kid" in suite.metrics:
            if reference.features is None:
                row["kid_mean"] = row["kid_std"] = float("nan")
            else:
                row["kid_mean"], row["kid_std"], row["kid_subset_size"] = kid(
                    feats, reference.features, suite.kid.subsets, suite.kid.subset_size, b.seed
                )
        rows.append(row)
    return pd.DataFrame(rows).astype({"n_flagged": "Int64"})


def _features_of(features: dict[str, np.ndarray], mine: pd.DataFrame, dim: int) -> np.ndarray:
    groups = mine.groupby("_unit", sort=False)
    # (0, dim) when every image of the configuration was excluded
    rows = [features[unit][group["_row"].to_numpy()] for unit, group in groups]
    return np.concatenate(rows) if rows else np.empty((0, dim))


def _write_tables(out: Output, table: pd.DataFrame, images: pd.DataFrame) -> None:
    per_image = images.drop(columns=[c for c in images.columns if c.startswith("_")])
    for name, frame in (("configs", table), ("images", per_image)):
        arrow = pa.Table.from_pandas(frame, preserve_index=False)
        out.put(
            f"{METRICS}/{name}.parquet",
            lambda tmp, arrow=arrow: pq.write_table(arrow, tmp, filesystem=out.fs),
        )
    csv = table.to_csv(index=False).encode()
    out.put(f"{METRICS}/configs.csv", lambda tmp: out.fs.pipe_file(tmp, csv))


def _provenance(
    suite: Suite,
    inputs: EvalInputs,
    reference: ReferenceStats | None,
    images: pd.DataFrame,
    workers: list[dict[str, Any]],
    seconds: float,
) -> dict[str, Any]:
    truncated = images.get("clip_truncated")
    return {
        "format": 1,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "suite": suite.to_dict(),
        "clip": dataclasses.asdict(inputs.clip) if inputs.clip else None,
        "extractor": dataclasses.asdict(inputs.extractor) if inputs.extractor else None,
        "reference": None
        if reference is None
        else {
            "source": inputs.reference.label,
            "cache": inputs.reference.cache,
            "sha256": reference.digest,
            "count": reference.count,
            "has_features": reference.features is not None,
            "meta": reference.meta,
        },
        "images": len(images),
        # the suite's `safety` policy decides whether these count in the metrics
        "flagged_images": int(images["nsfw_flagged"].sum()),
        "excluded_images": int(images["_excluded"].sum()),
        "truncated_prompts": int(images.loc[truncated, "prompt_id"].nunique())
        if truncated is not None
        else 0,
        "truncation": "prompts longer than CLIP's context are cut to it, keeping end-of-text",
        "versions": {**versions(), "torchmetrics": metadata.version("torchmetrics")},
        "workers": workers,
        "seconds": round(seconds, 3),
    }


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to metrics.json")
