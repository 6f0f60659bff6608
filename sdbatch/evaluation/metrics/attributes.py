"""Attribute accuracy, for prompts of the shapes world (`sdbatch.toy.world`): whether each image
shows the color, shape, size and position its prompt asks for, judged from its pixels with no
model. Per image 1 or 0 per attribute (`color_correct`, ...; NaN for prompts that are not world
captions); per configuration the share correct (`color_accuracy`, ...)."""

from __future__ import annotations

from typing import Any

import numpy as np

from sdbatch.evaluation.metric import ConfigGroup, Interval, Metric, Need, Score, UnitImages
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
    row: dict[str, Any] = {}
    for a in ATTRIBUTES:
        row.update(group.mean(f"{a}_correct", f"{a}_accuracy"))
    return row


ATTRIBUTE_ACCURACY = Metric(
    name="attribute_accuracy",
    label="attribute accuracy",
    higher_is_better=True,
    needs=frozenset({Need.JUDGE}),
    interval=Interval.PERCENTILE,
    aggregate=aggregate,
    scores=tuple(Score(f"{a}_accuracy", f"{a} correct") for a in ATTRIBUTES),
    image_columns=tuple(f"{a}_correct" for a in ATTRIBUTES),
    score_images=score_images,
    shard_token="attributes",
)
