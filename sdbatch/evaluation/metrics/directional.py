"""CLIP directional similarity (Gal et al. 2021, "StyleGAN-NADA", sec. 3.2; the image-editing
metric of diffusers' evaluation guide): whether an edit moved the image the way the prompt moved
the text. Per image, with the suite's CLIP model and every embedding L2-normalised first,

    cos(E_image(result) - E_image(source), E_text(prompt) - E_text(source prompt))

for images whose source has a caption (`prompts.source_prompt_column`); NaN for the others, which
are left out of the configuration's score, the mean over its images. 1: the image changed exactly
along the text's direction; 0: unrelated to it.

Cost: one CLIP image embedding per distinct source and one text embedding per distinct caption,
per unit, beside what CLIP score computes anyway.
"""

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


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def directional_similarity(
    results: np.ndarray, sources: np.ndarray, prompts: np.ndarray, source_prompts: np.ndarray
) -> np.ndarray:
    """Row by row, the cosine between the image direction (result - source) and the text
    direction (prompt - source prompt), of L2-normalised CLIP embeddings; NaN where a direction
    is zero."""
    image = _unit(results) - _unit(sources)
    text = _unit(prompts) - _unit(source_prompts)
    norms = np.linalg.norm(image, axis=1) * np.linalg.norm(text, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, (image * text).sum(axis=1) / norms, np.nan)


def score_images(unit: UnitImages) -> dict[str, np.ndarray]:
    values = np.full(len(unit.images), np.nan)
    made_from = unit.made_from
    rows = [i for i, s in enumerate(made_from) if s is not None and s.prompt is not None]
    if rows:
        sources = [made_from[i] for i in rows]
        distinct = {s.source_id: s.image for s in sources}
        embedded = dict(zip(distinct, unit.clip.embed_images(list(distinct.values())), strict=True))
        prompts, _ = unit.clip.embed_texts([unit.prompts[i] for i in rows])
        captions, _ = unit.clip.embed_texts([s.prompt for s in sources])
        values[rows] = directional_similarity(
            unit.image_embeddings[rows],
            np.stack([embedded[s.source_id] for s in sources]),
            prompts,
            captions,
        )
    return {"clip_directional": values}


def aggregate(group: ConfigGroup, settings: Any) -> dict[str, Any]:
    return group.mean("clip_directional")


CLIP_DIRECTIONAL = Metric(
    name="clip_directional",
    label="CLIP directional similarity",
    higher_is_better=True,
    judges=ALIGNMENT,
    needs=frozenset({Need.CLIP, Need.SOURCES}),
    interval=Interval.PERCENTILE,
    aggregate=aggregate,
    scores=(Score("clip_directional", "CLIP directional similarity", digits=3),),
    image_columns=("clip_directional",),
    score_images=score_images,
    shard_token="clip_directional",
    least=-1.0,
    most=1.0,
)
