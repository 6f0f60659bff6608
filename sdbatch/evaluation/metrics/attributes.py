"""Attribute accuracy, for prompts of the shapes world (`sdbatch.toy.world`): whether each image
shows the color, shape, size and position its prompt asks for, judged from its pixels with no
model. Per image 1 or 0 per attribute (`color_correct`, ...; NaN for prompts that are not world
captions); per configuration the share correct (`color_accuracy`, ...), and the share with every
attribute correct (`attribute_accuracy`, the headline: a scene is right only when all of it is)."""

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
from sdbatch.evaluation.metric_math import weighted_mean
from sdbatch.toy import world

ATTRIBUTES = ("color", "shape", "size", "position")


def judge_attributes(images: list[np.ndarray], prompts: list[str]) -> dict[str, np.ndarray]:
    """Per image, 1.0 or 0.0 per attribute the pixels show as asked; NaN for other prompts."""
    columns: dict[str, list[float]] = {f"{a}_correct": [] for a in ATTRIBUTES}
    for image, prompt in zip(images, prompts, strict=True):
        scene = world.Scene.parse(prompt)
        verdict = world.judge(image, scene) if scene else None
        for a in ATTRIBUTES:
            columns[f"{a}_correct"].append(float(getattr(verdict, a)) if verdict else np.nan)
    return {name: np.asarray(values) for name, values in columns.items()}


def score_images(unit: UnitImages) -> dict[str, np.ndarray]:
    return judge_attributes(unit.images, unit.prompts)


def aggregate(group: ConfigGroup, settings: Any) -> dict[str, Any]:
    # NaN (not a world caption) in any attribute stays NaN in the product, so it is left out
    every = group.images[[f"{a}_correct" for a in ATTRIBUTES]].to_numpy().prod(axis=1)
    row: dict[str, Any] = {"attribute_accuracy": weighted_mean(every, group.weights)}
    for a in ATTRIBUTES:
        row.update(group.mean(f"{a}_correct", f"{a}_accuracy"))
    return row


ATTRIBUTE_ACCURACY = Metric(
    name="attribute_accuracy",
    label="attribute accuracy",
    higher_is_better=True,
    judges=ALIGNMENT,
    needs=frozenset({Need.JUDGE}),
    interval=Interval.PERCENTILE,
    aggregate=aggregate,
    scores=(
        # three digits: a share's small differences are the telling ones
        Score("attribute_accuracy", "all attributes correct", digits=3),
        *(Score(f"{a}_accuracy", f"{a} correct", digits=3) for a in ATTRIBUTES),
    ),
    image_columns=tuple(f"{a}_correct" for a in ATTRIBUTES),
    score_images=score_images,
    shard_token="attributes",
    ranked=True,
)
