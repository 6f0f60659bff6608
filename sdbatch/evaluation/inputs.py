"""A suite resolved against the machine, on the driver, before any work: the CLIP model pinned,
the feature extractor described, the reference found (cached) or planned."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from sdbatch.evaluation.extractors import ExtractorInfo, describe_extractor
from sdbatch.evaluation.metric import Metric, Need
from sdbatch.evaluation.reference import ReferencePlan, plan_reference
from sdbatch.evaluation.registry import REGISTRY
from sdbatch.evaluation.suite import Suite, check_files
from sdbatch.models import CLIP, ModelSource, resolve_model


@dataclass(frozen=True)
class EvalInputs:
    """What a suite's metrics are computed with, pinned down."""

    clip: ModelSource | None  # loaded by the actors when a metric needs CLIP
    extractor: ExtractorInfo | None  # when a metric needs features
    reference: ReferencePlan | None  # when a metric needs a reference
    image_metrics: tuple[Metric, ...]  # the metrics whose per-image columns shards hold
    clip_embeddings: bool = False  # shards and the reference keep CLIP image embeddings

    @property
    def shard_key(self) -> str:
        """The name of the folder of generated shards: it changes with the CLIP model, the
        extractor, or the per-image columns, so a shard made for another suite is never used.
        Kept CLIP embeddings do not change it (see shards.CLIP_EMBEDDINGS)."""
        tokens = [m.shard_token for m in self.image_metrics if m.shard_token] or ["-"]
        parts = [
            self.clip.identity if self.clip else "-",
            self.extractor.key if self.extractor else "-",
            *tokens,
        ]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def resolve_suite(suite: Suite) -> EvalInputs:
    """Check a suite's files, models and reference before any work; raises InputError."""
    # 1. what the metrics are computed with
    check_files(suite)
    features = suite.needs(Need.FEATURES)
    embeddings = suite.needs(Need.EMBEDDINGS)
    wants_clip = suite.needs(Need.CLIP) or (features and suite.fid.features == "clip")
    clip = resolve_model(suite.clip.model, suite.clip.revision, CLIP) if wants_clip else None
    extractor = describe_extractor(suite.fid, clip) if features else None
    reference = None
    if suite.needs(Need.REFERENCE):
        cache = str(Path(suite.cache).expanduser()) if "://" not in suite.cache else suite.cache
        kept = clip.identity if embeddings else None
        reference = plan_reference(suite.reference, extractor, cache, kept)
    # 2. the per-image columns the shards hold (see Metric.shard_token)
    chosen = suite.chosen_metrics
    loaded = {Need.JUDGE, *([Need.CLIP] if clip else []), *([Need.FEATURES] if extractor else [])}
    image_metrics = tuple(
        m
        for m in REGISTRY.values()
        if m.score_images is not None and (m in chosen if m.shard_token else m.needs <= loaded)
    )
    return EvalInputs(clip, extractor, reference, image_metrics, embeddings)
