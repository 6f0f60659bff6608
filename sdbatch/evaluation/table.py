"""The per-configuration table (configs.parquet): each configuration's parameters, how many images
it has and how many count, its cost (model evaluations per image, and measured seconds per image
with warm-up left out), and the columns of every metric of the suite; and the bootstrap replicates
of the columns with intervals, all drawn on the same prompts.

The metrics of a configuration (`config_metrics`) are computed on the driver, or, on a cluster,
by Ray actors (`TableWorker`), configurations in parallel (`table_metrics`). Both run the same
function on the same values: the driver draws the replicates once for all. The driver computes
the first configuration, and with it the reference's parts that metrics compute once (FID's square
root, KID's reference kernels, PRDC's radii), and the second, whose time says whether actors
repay their start; every actor reads those parts once from the object store, and a
configuration's features and statistics travel once, to the actor that computes it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd

from sdbatch import distribute
from sdbatch.errors import JobFailed
from sdbatch.evaluation.gather import Gathered
from sdbatch.evaluation.metric import ConfigGroup, Metric, Need, aggregate_with_intervals
from sdbatch.evaluation.metric_math import FeatureStats, FrechetReference, cluster_counts
from sdbatch.evaluation.reference import ReferenceStats
from sdbatch.evaluation.suite import Suite
from sdbatch.records import BatchTiming, RunRecord, UnitMarker

log = logging.getLogger("sdbatch")

CONFIG_COLUMNS = (
    "config_id",
    "model",
    "lora",
    "lora_scale",
    "task",  # text2img, img2img, inpaint, outpaint or depth2img
    "strength",  # null where the task has none
    "outpaint",  # pixels added per side, "t0-r16-b0-l0"; null but for outpaint
    "scheduler",
    "num_inference_steps",
    "guidance_scale",
)
# Measured, so they change from one run of the same images to the next.
TIMING_COLUMNS = (
    "seconds_per_image_median",
    "seconds_per_image_q1",
    "seconds_per_image_q3",
    "timed_batches",
    "warmup_batches",
    "devices",
)


def batch_frame(markers: list[UnitMarker]) -> pd.DataFrame:
    """One row per pipeline call: config_id, images, seconds (its wall time), warmup, device.

    A unit of sdbatch 0.1 kept no per-call times: it is one row, its warm-up unknown (False).
    """
    rows = [
        (m.config_id, b.images, b.seconds, b.warmup, m.device or "unknown")
        for m in markers
        for b in m.batches or [BatchTiming(m.images, m.generation_seconds, False)]
    ]
    columns = ["config_id", "images", "seconds", "warmup", "device"]
    return pd.DataFrame(rows, columns=columns)


def timing(batches: pd.DataFrame) -> dict[str, Any]:
    """Seconds per image of one configuration's calls: the median and quartiles over the calls
    that are not warm-up (each call one measurement), the calls counted, and the devices."""
    timed = batches[~batches["warmup"]]
    per_image = (timed["seconds"] / timed["images"]).to_numpy(float)
    q1, median, q3 = np.percentile(per_image, [25, 50, 75]) if len(per_image) else [np.nan] * 3
    return {
        "seconds_per_image_median": median,
        "seconds_per_image_q1": q1,
        "seconds_per_image_q3": q3,
        "timed_batches": len(timed),
        "warmup_batches": int(batches["warmup"].sum()),
        "devices": ", ".join(sorted(set(batches["device"]))),
    }


@dataclass(frozen=True)
class ConfigUnit:
    """One configuration's images that count (those the safety checker flagged are left out
    under `safety: exclude`) and what its metrics read of them: plain values, so Ray ships them
    whole, once."""

    unit_id: str  # its config_id (distribute's name for a unit's id)
    images: pd.DataFrame  # their per-image columns
    merged: FeatureStats | None  # their features' statistics from the shards (None: no extractor)
    features: np.ndarray | None  # None where no metric reads features
    clip_embeddings: np.ndarray | None  # None where no metric keeps them


@dataclass
class TableContext:
    """What every configuration's metrics are computed with: the suite, the reference, and the
    bootstrap's draws of the run's prompts. Replicate r draws the same prompts for every
    configuration, whichever process computes it: that pairs them."""

    suite: Suite
    # The suite's metrics, resolved here: one registered only in the driver's process (a
    # notebook's) reaches the actors too.
    metrics: tuple[Metric, ...]
    reference: ReferenceStats | None
    feature_dim: int | None
    prompts: pd.Index  # the run's prompt ids, sorted: the columns of `draws`
    draws: np.ndarray  # (replicates, prompts): how often each replicate draws each prompt

    @classmethod
    def of(
        cls,
        suite: Suite,
        reference: ReferenceStats | None,
        feature_dim: int | None,
        prompt_ids: pd.Series,
    ) -> TableContext:
        """The context of a run whose images have these prompt ids."""
        prompts = pd.Index(sorted(prompt_ids.unique()))
        b = suite.bootstrap
        draws = cluster_counts(len(prompts), b.samples, b.seed)
        return cls(suite, tuple(suite.chosen_metrics), reference, feature_dim, prompts, draws)

    @cached_property
    def frechet(self) -> FrechetReference | None:
        """The reference's Gaussian with its square root (None: CLIP embeddings alone, CMMD)."""
        if self.reference is None or self.reference.mu is None:
            return None
        return FrechetReference(self.reference.mu, self.reference.sigma)


def config_metrics(
    unit: ConfigUnit, context: TableContext
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A configuration's metric columns, with intervals, and those columns' bootstrap
    replicates; the reference's parts metrics compute once are kept in `context`."""
    suite = context.suite
    group = ConfigGroup(
        config_id=unit.unit_id,
        images=unit.images,
        merged=unit.merged,
        reference=context.reference,
        frechet=context.frechet,
        feature_dim=context.feature_dim,
        bootstrap=suite.bootstrap,
        load_features=lambda: unit.features,
        load_clip_embeddings=lambda: unit.clip_embeddings,
    )
    weights = context.draws[:, context.prompts.get_indexer(unit.images["prompt_id"])]
    columns: dict[str, Any] = {}
    replicates: dict[str, np.ndarray] = {}
    for metric in context.metrics:
        row, drawn = aggregate_with_intervals(metric, group, suite.settings_of(metric), weights)
        columns.update(row)
        replicates.update(drawn)
    return columns, replicates


def config_table(
    run: RunRecord,
    markers: list[UnitMarker],
    gathered: Gathered,
    reference: ReferenceStats | None,
    feature_dim: int | None,
    suite: Suite,
    on_ray: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame, list[dict[str, Any]]]:
    """One row per configuration with generated images, in the order of the run's sweep; the
    replicates: per configuration and replicate, each column with an interval; and the actors
    that computed configurations (`TableMetrics.workers`).

    Args:
        on_ray: compute the configurations' metrics on actors of the Ray session open now,
            where they repay their start (`table_metrics`).
    """
    # 1. the configurations with generated images (configured ones may not be generated yet)
    images = gathered.images
    by_config = dict(tuple(images.groupby("config_id", sort=False)))
    configs = [c for c in run.configs if c.config_id in by_config]
    context = TableContext.of(suite, reference, feature_dim, images["prompt_id"])
    units = [config_unit(c.config_id, by_config[c.config_id], gathered, context) for c in configs]
    # 2. their metrics
    metrics = table_metrics(units, context, on_ray)
    # 3. the rows: parameters, counts, timing, metrics
    batches = batch_frame(markers)
    rows, replicates = [], []
    for config in configs:
        config_id = config.config_id
        generated = by_config[config_id]
        row: dict[str, Any] = {"config_id": config_id}
        row.update({c: getattr(config, c) for c in CONFIG_COLUMNS[1:]})
        row["n_images"] = len(generated)
        checked = generated["nsfw_flagged"].dropna()
        # null where no image went through a safety checker, so "none flagged" means checked
        row["n_flagged"] = int(checked.sum()) if len(checked) else None
        row["n_excluded"] = int(generated["_excluded"].sum())
        row["unet_evals_per_image"] = config.unet_evals_per_image
        row.update(timing(batches[batches["config_id"] == config_id]))
        columns, drawn = metrics.results[config_id]
        row.update(columns)
        rows.append(row)
        replicate = {"config_id": config_id, "replicate": np.arange(len(context.draws))}
        replicates.append(pd.DataFrame({**replicate, **drawn}))
    table = pd.DataFrame(rows).astype({"n_flagged": "Int64", "strength": "float64"})
    for metric in suite.chosen_metrics:
        if metric.caveat is not None and (warning := metric.caveat(table)):
            log.warning("%s", warning)
    return table, pd.concat(replicates), metrics.workers


def config_unit(
    config_id: str, generated: pd.DataFrame, gathered: Gathered, context: TableContext
) -> ConfigUnit:
    """A configuration's unit, from its generated images' rows of `gathered.images`."""
    counted = generated[~generated["_excluded"]]  # the images the metrics are computed on
    features = embeddings = None
    if context.suite.needs(Need.FEATURES):
        features = gathered.features_of(counted, context.feature_dim)
    if context.suite.needs(Need.EMBEDDINGS):
        embeddings = gathered.clip_embeddings_of(counted)
    return ConfigUnit(config_id, counted, gathered.stats.get(config_id), features, embeddings)


# Table actors start in seconds (new processes that import torch; 5 s on an idle 2-core machine,
# 15 s on a busy one): where the configurations after the first would take less than this
# here, the driver computes them.
ACTOR_START_SECONDS = 30.0
# numpy's BLAS reads its thread count from these when it loads: an actor's process starts with
# them set to its share of the cores.
BLAS_THREADS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class TableSetup:
    """What every table actor starts from."""

    context: Any  # a TableContext, or a reference to one in Ray's object store
    threads: int | None = None
    log_dir: str | None = None  # unused: the math logs nothing of its libraries'


class TableWorker:
    """Computes configurations' metrics against one context, read once (from Ray's object store
    when given a reference); a plain class, which distribute.py wraps in a Ray actor."""

    def __init__(self, setup: TableSetup):
        import torch

        if setup.threads:
            torch.set_num_threads(setup.threads)  # FrechetResamples solves that many at once
        context = setup.context
        if not isinstance(context, TableContext):
            import ray

            context = ray.get(context)
        self.context: TableContext = context
        self.units = 0  # configurations computed

    def describe(self) -> dict[str, Any]:
        """Where this worker runs and how many configurations it computed, for the provenance."""
        where = {"host": socket.gethostname(), "pid": os.getpid(), "device": "cpu"}
        return {**where, "units": self.units}

    def run(self, unit: ConfigUnit) -> Iterator[int | tuple[dict, dict]]:
        """A configuration's metrics (`config_metrics`), after its image count for the bar."""
        result = config_metrics(unit, self.context)
        self.units += 1
        yield len(unit.images)
        yield result


@dataclass
class TableMetrics:
    """Every configuration's `config_metrics` by id, and the actors that computed some (with how
    many each), if any did."""

    results: dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]]
    workers: list[dict[str, Any]]


def table_metrics(
    units: list[ConfigUnit],
    context: TableContext,
    on_ray: bool,
    actors: int | None = None,
    start_seconds: float | None = None,
) -> TableMetrics:
    """Every unit's `config_metrics`: the first two here (the first computes the reference's
    parts too); the others on `actors` CPU actors of the Ray session open now (default: one per
    CPU of the cluster, at most one per unit) when `on_ray` and the second one took long enough
    that they would take longer here than `start_seconds` (default: ACTOR_START_SECONDS); else
    here.

    Raises:
        JobFailed: a configuration failed on every attempt of an actor.
    """
    done = TableMetrics({}, [])
    rest, seconds = list(units), 0.0
    # 1. the first configuration, and with it the reference's parts every other one reuses;
    # then the second, whose time (without those parts) says what the others would take here
    for _ in range(2 if on_ray else 0):
        if rest:
            began = time.perf_counter()
            done.results[rest[0].unit_id] = config_metrics(rest[0], context)
            seconds, rest = time.perf_counter() - began, rest[1:]
    # 2. the others: on actors where they repay their start
    start = ACTOR_START_SECONDS if start_seconds is None else start_seconds
    if on_ray and rest and seconds * len(rest) > start:
        on_actors = _on_actors(rest, context, actors)
        done.results.update(on_actors.results)
        done.workers = on_actors.workers
    else:
        done.results.update({u.unit_id: config_metrics(u, context) for u in rest})
    return done


def _on_actors(
    units: list[ConfigUnit], context: TableContext, actors: int | None
) -> distribute.RunResult:
    import ray

    count = actors or int(ray.cluster_resources().get("CPU", 1))
    plan = distribute.cpu_actors(max(1, min(count, len(units))))
    log.info("metrics of %d more configurations on %s", len(units), plan.describe())
    # the reference's parts travel once to the object store, and from it once to each actor
    setup = TableSetup(ray.put(context))
    progress = (sum(len(u.images) for u in units), 0, "metrics")
    env = dict.fromkeys(BLAS_THREADS, str(plan.threads))
    retries = context.suite.runtime.retries
    done = distribute.run_units(TableWorker, setup, units, plan, progress, retries, env=env)
    if done.failed:
        unit_id, failure = next(iter(done.failed.items()))
        raise JobFailed(
            f"the metrics of {len(done.failed)} configuration(s) failed after "
            f"{failure.attempts} attempts, first {unit_id}: {failure.error}"
        )
    return done
