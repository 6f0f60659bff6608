"""The shapes world, its pixel judge, the training code, and the shipped toy CLIP."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from sdbatch.builtin import builtin_path
from sdbatch.models import load_pipeline, resolve_model
from sdbatch.toy.train import train_toy, train_toy_clip, zero_shot_accuracy
from sdbatch.toy.world import ATTRIBUTES_OF, SCENES, Scene, judge, render, samples


def test_captions_name_their_scene():
    for scene in SCENES:
        assert Scene.parse(scene.caption) == scene
        assert Scene.parse(f"photo: {scene.caption}, detailed") == scene
    assert Scene.parse("an astronaut riding a horse") is None
    assert len(SCENES) == 4 * 3 * 2 * 3


def test_rendering_is_deterministic():
    first = [np.asarray(image) for image, _ in samples(20, seed=5)]
    again = [np.asarray(image) for image, _ in samples(20, seed=5)]
    other = [np.asarray(image) for image, _ in samples(20, seed=6)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_judge_accepts_true_images_and_catches_each_wrong_attribute():
    for image, caption in samples(400, seed=1):
        verdict = judge(np.asarray(image), Scene.parse(caption))
        assert all(dataclasses.astuple(verdict)), caption
    for scene in SCENES:
        image = np.asarray(render(scene, seed=3))
        for attribute, values in ATTRIBUTES_OF.items():
            for value in values:
                if value == getattr(scene, attribute):
                    continue
                asked = dataclasses.replace(scene, **{attribute: value})
                verdict = judge(image, asked)
                assert not getattr(verdict, attribute), (scene, asked)
    blank = np.full((32, 32, 3), 235, dtype=np.uint8)
    assert not any(dataclasses.astuple(judge(blank, SCENES[0])))


def test_shipped_toy_clip_names_color_and_shape_zero_shot():
    accuracy = zero_shot_accuracy(builtin_path("toy-clip"), count=600)
    assert accuracy["color"] >= 0.95 and accuracy["shape"] >= 0.95, accuracy


def test_shipped_toy_models_stay_small():
    total = sum(
        p.stat().st_size
        for name in ("toy", "toy-clip")
        for p in builtin_path(name).rglob("*")
        if p.is_file()
    )
    assert total <= 20 * 2**20


def test_training_still_runs_and_saves_loadable_models(tmp_path):
    """A few steps of each training loop, then the pipeline loads through from_pretrained."""
    train_toy_clip(tmp_path / "clip", steps=3, batch=16, samples=128)
    train_toy(tmp_path / "toy", tmp_path / "clip", vae_steps=2, unet_steps=2, batch=8, samples=128)
    pipe = load_pipeline(resolve_model(str(tmp_path / "toy")), "fp32", "cpu")
    image = pipe(
        "a small red circle on the left",
        num_inference_steps=2,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
    assert zero_shot_accuracy(tmp_path / "clip", count=24)["color"] >= 0
