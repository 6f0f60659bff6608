"""`sdbatch eval`: the suite's metrics for every sweep configuration of a generated output.

Writes OUT/metrics/:
    configs.parquet, configs.csv   one row per configuration: its parameters, n_images, how many
                                   the safety checker flagged and the suite's `safety` excluded,
                                   seconds per image, and every metric's columns with intervals
    images.parquet                 one row per image: its flag and per-image scores, joinable to
                                   the images on (prompt_id, sample_index, config_id)
    replicates.parquet             per configuration and bootstrap replicate, every column that
                                   has an interval; replicate r draws the same prompts for every
                                   configuration (evaluation.metric), so they pair
    differences.parquet            per ranked metric, the best configuration minus every other,
                                   with paired intervals that hold together (evaluation.compare)
    effects.parquet                per sweep axis and level, every column with an interval
                                   averaged over the other axes, and its difference from the
                                   axis's first level, with paired intervals
    metrics.json                   provenance (evaluation.record), written last
    _shards/KEY/UNIT.npz           per-image features, scores and (for CMMD) CLIP embeddings of
                                   each generated unit, with its unit id and image keys; a rerun
                                   (after a crash, or once more images exist) extracts only what
                                   is missing or does not match its unit. KEY changes with the
                                   CLIP model, the extractor or the per-image metrics.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from importlib import metadata

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sdbatch import distribute
from sdbatch.errors import InputError, JobFailed
from sdbatch.evaluation.compare import best_versus_others, draws_identity, main_effects
from sdbatch.evaluation.gather import gather
from sdbatch.evaluation.inputs import EvalInputs, resolve_suite
from sdbatch.evaluation.metric import RESAMPLING_UNIT, Need
from sdbatch.evaluation.record import MetricsRecord, ReferenceProvenance, write_metrics_record
from sdbatch.evaluation.reference import ReferenceStats
from sdbatch.evaluation.shards import CLIP_EMBEDDINGS, SHARDS, FeatureUnit, pending_units
from sdbatch.evaluation.suite import Suite, load_suite
from sdbatch.evaluation.table import config_table
from sdbatch.evaluation.worker import ExtractionSetup, FeatureWorker
from sdbatch.in_process import run_units_here
from sdbatch.integrity import summarize, unit_problems
from sdbatch.output import METRICS_DIR, SOURCES, Output
from sdbatch.records import library_versions

log = logging.getLogger("sdbatch")


@dataclass(frozen=True)
class EvalSummary:
    """What an eval call produced."""

    metrics: str  # the metrics folder
    configs: pd.DataFrame  # the per-configuration table
    seconds: float  # the whole call
    extraction_seconds: float = 0.0  # from the first loaded actor to the last shard written


def check_sources(suite: Suite, has_sources: bool, lacking: str) -> None:
    """Refuse a suite whose metrics compare images with their sources for a run without any
    (a text2img run); `lacking` says why there are none, for the error."""
    if suite.needs(Need.SOURCES) and not has_sources:
        needing = next(m.name for m in suite.chosen_metrics if Need.SOURCES in m.needs)
        raise InputError(
            f"metrics: {needing} compares images with their sources, and {lacking}; leave it "
            "out of the suite"
        )


def evaluate(
    output: str,
    suite: Suite | None = None,
    *,
    address: str | None = None,
    inputs: EvalInputs | None = None,
) -> EvalSummary:
    """Compute the suite's metrics for every configuration in `output`; resumable.

    Args:
        suite: default: the suite the output's job spec names (its `suite:`).
        address: a Ray cluster address; None joins $RAY_ADDRESS or starts a local instance.
        inputs: the suite already resolved (`resolve_suite`), when the caller checked it early.

    Raises:
        InputError: no generated images, no suite, or a bad suite, model or reference; before
            any work.
        JobFailed: feature extraction broke, or a shard's bytes were damaged (and it was
            deleted); finished shards are kept and a rerun resumes.
    """
    began = time.perf_counter()
    # 1. check every input before anything expensive starts
    out = Output(output)
    run = out.read_run()
    if run is None:
        raise InputError(f"OUT: {output} holds no sdbatch run (no run.json); generate first")
    markers = sorted(out.done_units(), key=lambda m: m.unit_id)
    if not markers or sum(m.images for m in markers) == 0:
        raise InputError(f"OUT: {output} has no generated images yet")
    if problems := unit_problems(out, markers, run.identity):
        raise InputError(
            f"OUT: {summarize(problems)}; rerun `sdbatch generate` with its job spec to redo "
            f"them (`sdbatch verify {output}` lists them all)"
        )
    if suite is None:
        if run.spec.suite is None:
            raise InputError("suite: required; the job spec of this output names no suite")
        suite = load_suite(run.spec.suite)
    inputs = inputs or resolve_suite(suite)
    sources = None
    if suite.needs(Need.SOURCES):
        exists = out.fs.exists(out.path(SOURCES))
        check_sources(suite, exists, f"{output} has no {SOURCES} (a text2img run)")
        sources = f"{out.location}/{SOURCES}"

    # 2. plan: the reference (unless cached) and every generated unit without a shard of its own
    shard_dir = f"{METRICS_DIR}/{SHARDS}/{inputs.shard_key}"
    image_columns = tuple(c for m in inputs.image_metrics for c in m.image_columns)
    features = ("features",) if inputs.extractor else ()
    embeddings = (CLIP_EMBEDDINGS,) if inputs.clip_embeddings else ()
    units = pending_units(
        [
            FeatureUnit(
                unit_id=m.unit_id,
                files=(f"{out.location}/{m.file}",),
                destination=f"{out.location}/{shard_dir}/{m.unit_id}.npz",
                num_images=m.images,
                sources=sources,
            )
            for m in markers
        ],
        (*features, *embeddings, *image_columns),
    )
    reference_units = inputs.reference.missing_units() if inputs.reference else []
    reference_images = sum(u.num_images for u in inputs.reference.units) if inputs.reference else 0
    generated = sum(m.images for m in markers)
    todo = reference_units + units
    log.info(
        "evaluating %s: %d images in %d configurations (%s); %d units to extract",
        out.location, generated, len({m.config_id for m in markers}), ", ".join(suite.metrics),
        len(todo),
    )  # fmt: skip

    # 3. extract features on Ray actors: reference shards first, then generated ones
    results, workers, extraction = {}, [], 0.0
    if todo:
        total = generated + reference_images
        progress = (total, total - sum(u.num_images for u in todo), "evaluating")
        setup = _setup(inputs, suite, todo, log_dir=out.log_folder())
        result = _extract(setup, todo, suite, address, progress)
        results, workers, extraction = result.results, result.workers, result.seconds
    reference = inputs.reference.statistics() if inputs.reference is not None else None

    # 4. merge every shard's statistics per configuration, and compute the metrics
    gathered = gather(out, shard_dir, markers, results, image_columns, suite.safety)
    images = gathered.images
    if excluded := int(images["_excluded"].sum()):
        log.info("%d images the safety checker flagged are left out of the metrics", excluded)
    feature_dim = inputs.extractor.dim if inputs.extractor else None
    # On a cluster (named, or a session already open) its actors compute the configurations'
    # metrics; without one, the driver does: a local Ray instance would share its cores.
    on_ray = distribute.has_cluster(address)
    with distribute.session(address) if on_ray else nullcontext():
        table, replicates, table_workers = config_table(
            run, markers, gathered, reference, feature_dim, suite, on_ray
        )

    confidence = suite.bootstrap.confidence
    differences = best_versus_others(table, replicates, confidence)
    effects = main_effects(table, replicates, confidence)

    # 5. write the tables, then metrics.json last: it says the set is complete
    _write_tables(
        out,
        {
            "configs": table,
            "images": images.drop(columns=[c for c in images.columns if c.startswith("_")]),
            "replicates": replicates,
            "differences": differences,
            "effects": effects,
        },
    )
    record = _metrics_record(
        suite, inputs, reference, images, workers, table_workers, time.perf_counter() - began
    )
    write_metrics_record(out, record)
    log.info("metrics of %d configurations in %s/%s", len(table), out.location, METRICS_DIR)
    seconds = time.perf_counter() - began
    return EvalSummary(f"{out.location}/{METRICS_DIR}", table, seconds, extraction)


def compute_reference(suite: Suite, *, address: str | None = None) -> str:
    """Compute and cache the suite's reference statistics (if not cached yet); returns the file.

    Raises:
        InputError: the suite has no metric that needs a reference, or a bad reference.
    """
    inputs = resolve_suite(suite)
    if inputs.reference is None:
        raise InputError("reference: this suite has no FID, KID or CMMD metric, so no reference")
    plan = inputs.reference
    if todo := plan.missing_units():
        total = sum(u.num_images for u in plan.units)
        progress = (total, total - sum(u.num_images for u in todo), "reference")
        _extract(_setup(inputs, suite, todo), todo, suite, address, progress)
    plan.statistics()
    return plan.cache or plan.label


def _setup(
    inputs: EvalInputs, suite: Suite, units: list[FeatureUnit], log_dir: str | None = None
) -> ExtractionSetup:
    # Reference images have no prompts to score: they need CLIP only as the feature extractor,
    # or for the embeddings CMMD keeps.
    scoring = any(u.generated for u in units)
    clip_features = inputs.extractor is not None and inputs.extractor.name == "clip"
    return ExtractionSetup(
        clip=inputs.clip if scoring or clip_features or inputs.clip_embeddings else None,
        extractor=inputs.extractor,
        batch_size=suite.runtime.batch_size,
        image_metrics=inputs.image_metrics,
        clip_embeddings=inputs.clip_embeddings,
        log_dir=log_dir,
    )


def extracts_here(suite: Suite, address: str | None) -> bool:
    """Whether the driver's own process extracts the features, without Ray: when the one CPU
    actor on this machine (no cluster, no GPU) would only add a Ray instance and a second process
    importing torch. Its library warnings then go where the caller's go."""
    return suite.runtime.actors in (1, "auto") and distribute.local_without_gpu(address)


def _extract(
    setup: ExtractionSetup,
    units: list[FeatureUnit],
    suite: Suite,
    address: str | None,
    progress: tuple[int, int, str],
) -> distribute.RunResult:
    retries = suite.runtime.retries
    if extracts_here(suite, address):
        here = replace(setup, log_dir=None)
        result = run_units_here(FeatureWorker, here, units, progress, retries)
    else:
        with distribute.session(address):
            plan = distribute.plan_actors(suite.runtime.actors)
            if plan.gpus and setup.decode_threads is None:
                setup = replace(setup, decode_threads=distribute.cpus_per_gpu())
            result = distribute.run_units(FeatureWorker, setup, units, plan, progress, retries)
    if result.failed:
        # Metrics over a configuration with missing shards would be silently biased.
        unit_id, failure = next(iter(result.failed.items()))
        raise JobFailed(
            f"{len(result.failed)} unit(s) could not be extracted after "
            f"{failure.attempts} attempts, first {unit_id}: {failure.error}"
        )
    return result


def _write_tables(out: Output, tables: dict[str, pd.DataFrame]) -> None:
    for name, frame in tables.items():
        arrow = pa.Table.from_pandas(frame, preserve_index=False)
        out.put(
            f"{METRICS_DIR}/{name}.parquet",
            lambda tmp, arrow=arrow: pq.write_table(arrow, tmp, filesystem=out.fs),
        )
    csv = tables["configs"].to_csv(index=False).encode()
    out.put(f"{METRICS_DIR}/configs.csv", lambda tmp: out.fs.pipe_file(tmp, csv))


def _metrics_record(
    suite: Suite,
    inputs: EvalInputs,
    reference: ReferenceStats | None,
    images: pd.DataFrame,
    workers: list[dict],
    table_workers: list[dict],
    seconds: float,
) -> MetricsRecord:
    truncated = images.get("clip_truncated")
    return MetricsRecord(
        finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        suite=suite,
        clip=inputs.clip,
        extractor=inputs.extractor,
        reference=None
        if reference is None
        else ReferenceProvenance(
            source=inputs.reference.label,
            cache=inputs.reference.cache,
            sha256=reference.digest,
            count=reference.count,
            has_features=reference.features is not None,
            meta=reference.meta,
        ),
        images=len(images),
        versions={**library_versions(), "torchmetrics": metadata.version("torchmetrics")},
        workers=tuple(workers),
        table_workers=tuple(table_workers),
        seconds=round(seconds, 3),
        flagged_images=int(images["nsfw_flagged"].sum()),
        excluded_images=int(images["_excluded"].sum()),
        truncated_prompts=int(images.loc[truncated, "prompt_id"].nunique())
        if truncated is not None
        else 0,
        intervals={m.name: m.interval.value for m in suite.chosen_metrics},
        bootstrap_unit=RESAMPLING_UNIT,
        bootstrap_draws=draws_identity(list(images["prompt_id"]), suite.bootstrap),
    )
