"""CLIP score (Hessel et al. 2021, with torchmetrics' weight w = 100): per image
100 * max(cos(E_image, E_text), 0) with the suite's CLIP model; a configuration's score is the
mean over its images. Prompts longer than CLIP's context are cut to it, keeping end-of-text, and
flagged per image (`clip_truncated`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from sdbatch.evaluation.metric import (
    ALIGNMENT,
    ConfigGroup,
    Interval,
    Metric,
    Need,
    Score,
    UnitImages,
)
from sdbatch.evaluation.metric_math import clip_scores


def score_images(unit: UnitImages) -> dict[str, np.ndarray]:
    texts, truncated = unit.clip.embed_texts(unit.prompts)
    return {"clip_score": clip_scores(unit.image_embeddings, texts), "clip_truncated": truncated}


def aggregate(group: ConfigGroup, settings: Any) -> dict[str, Any]:
    return group.mean("clip_score")


CLIP_SCORE = Metric(
    name="clip_score",
    label="CLIP score",
    higher_is_better=True,
    judges=ALIGNMENT,
    needs=frozenset({Need.CLIP}),
    interval=Interval.PERCENTILE,
    aggregate=aggregate,
    scores=(Score("clip_score", "CLIP score"),),
    image_columns=("clip_score", "clip_truncated"),
    score_images=score_images,
    # One text embedding per prompt: computed whenever CLIP is loaded, so a shard's key (which
    # names the CLIP model) says whether it holds the scores.
    shard_token=None,
    ranked=True,
)
