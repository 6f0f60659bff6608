"""The per-configuration table (configs.parquet): each configuration's parameters, how many images
it has and how many count, its cost (model evaluations per image, and measured seconds per image
with warm-up left out), and the columns of every metric of the suite; and the bootstrap replicates
of the columns with intervals, all drawn on the same prompts."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from sdbatch.evaluation.gather import Gathered
from sdbatch.evaluation.metric import ConfigGroup, aggregate_with_intervals
from sdbatch.evaluation.metric_math import FrechetReference, cluster_counts
from sdbatch.evaluation.reference import ReferenceStats
from sdbatch.evaluation.suite import Suite
from sdbatch.records import BatchTiming, RunRecord, UnitMarker

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


def config_table(
    run: RunRecord,
    markers: list[UnitMarker],
    gathered: Gathered,
    reference: ReferenceStats | None,
    feature_dim: int | None,
    suite: Suite,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per configuration with generated images, in the order of the run's sweep; and
    the replicates: per configuration and replicate, each column with an interval."""
    frechet = None
    if reference is not None and reference.mu is not None:  # None: CLIP embeddings alone (CMMD)
        frechet = FrechetReference(reference.mu, reference.sigma)
    batches = batch_frame(markers)
    images = gathered.images
    # Each replicate draws the run's prompts once for every configuration: that pairs them.
    prompts = pd.Index(sorted(images["prompt_id"].unique()))
    b = suite.bootstrap
    draws = cluster_counts(len(prompts), b.samples, b.seed)
    rows, replicates = [], []
    for config in run.configs:
        config_id = config.config_id
        generated = images[images["config_id"] == config_id]
        if generated.empty:
            continue  # configured but not generated yet
        counted = generated[~generated["_excluded"]]  # the images the metrics are computed on
        row: dict[str, Any] = {"config_id": config_id}
        row.update({c: getattr(config, c) for c in CONFIG_COLUMNS[1:]})
        row["n_images"] = len(generated)
        checked = generated["nsfw_flagged"].dropna()
        # null where no image went through a safety checker, so "none flagged" means checked
        row["n_flagged"] = int(checked.sum()) if len(checked) else None
        row["n_excluded"] = len(generated) - len(counted)
        row["unet_evals_per_image"] = config.unet_evals_per_image
        row.update(timing(batches[batches["config_id"] == config_id]))
        group = ConfigGroup(
            config_id=config_id,
            images=counted,
            merged=gathered.stats.get(config_id),
            reference=reference,
            frechet=frechet,
            feature_dim=feature_dim,
            bootstrap=suite.bootstrap,
            load_features=lambda counted=counted: gathered.features_of(counted, feature_dim),
            load_clip_embeddings=lambda counted=counted: gathered.clip_embeddings_of(counted),
        )
        weights = draws[:, prompts.get_indexer(counted["prompt_id"])]
        drawn = {"config_id": config_id, "replicate": np.arange(len(draws))}
        for metric in suite.chosen_metrics:
            columns, resampled = aggregate_with_intervals(
                metric, group, suite.settings_of(metric), weights
            )
            row.update(columns)
            drawn.update(resampled)
        rows.append(row)
        replicates.append(pd.DataFrame(drawn))
    table = pd.DataFrame(rows).astype({"n_flagged": "Int64", "strength": "float64"})
    return table, pd.concat(replicates)
