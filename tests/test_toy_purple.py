"""Purple in the shapes world, and builtin:toy-purple, the LoRA adapter that teaches it to
builtin:toy: its training loop, its diffusers format, and what its scale does to the images."""

from __future__ import annotations

import dataclasses
import io
import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO
from PIL import Image
from safetensors import safe_open

from sdbatch.builtin import builtin_adapter_path, builtin_names, builtin_path
from sdbatch.errors import InputError
from sdbatch.models import load_pipeline, resolve_model
from sdbatch.prompts import load_prompts
from sdbatch.schedulers import make_scheduler
from sdbatch.spec import load_spec
from sdbatch.toy import world
from sdbatch.toy.lora import train_toy_purple

LORA_FILE = "pytorch_lora_weights.safetensors"


def toy_pipeline():
    """builtin:toy as sdbatch loads it, with euler (its default, PNDM, draws it badly)."""
    pipe = load_pipeline(resolve_model("builtin:toy"), "fp32", "cpu")
    pipe.scheduler = make_scheduler("euler", pipe.scheduler.config)
    return pipe


def draw(pipe, prompts: list[str], seed: int = 100) -> np.ndarray:
    """The pipeline's images (uint8) of `prompts`, image i from generator seed `seed + i`."""
    images = pipe(
        prompts,
        num_inference_steps=20,
        guidance_scale=4.0,
        height=32,
        width=32,
        generator=[torch.Generator().manual_seed(seed + i) for i in range(len(prompts))],
        output_type="np",
    ).images
    return (images * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def toy():
    """builtin:toy as sdbatch loads it, with builtin:toy-purple loaded as adapter "purple"."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on the shared 2-core machine wait on each other
    pipe = toy_pipeline()
    pipe.load_lora_weights(builtin_adapter_path("toy-purple"), adapter_name="purple")
    yield pipe
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_images(toy):
    """builtin:toy's own images, no adapter loaded, of each of its 72 training captions."""
    return draw(toy_pipeline(), [s.caption for s in world.SCENES])


def test_base_models_training_scenes_have_no_purple():
    """builtin:toy and toy-clip learnt from world.samples over SCENES: the same 72 scenes in the
    same order give the same pairs, as the shipped FID reference, drawn the same way, shows."""
    colors = ("red", "green", "blue", "yellow")
    scenes = itertools.product(world.SHAPES, colors, world.SIZES, world.POSITIONS)
    assert [world.Scene(*s) for s in scenes] == world.SCENES
    reference = pd.read_parquet(REPO / "eval" / "demo-reference.parquet")
    pairs = world.samples(len(reference), seed=0)
    assert [caption for _, caption in pairs] == reference["caption"].tolist()
    for (image, _), cell in zip(pairs, reference["image"], strict=True):
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(cell["bytes"]))))


def test_judge_knows_purple_and_calls_no_base_color_purple():
    for image, caption in world.samples(100, seed=3, scenes=world.PURPLE_SCENES):
        scene = world.Scene.parse(caption)
        assert scene.color == "purple"
        assert all(dataclasses.astuple(world.judge(np.asarray(image), scene))), caption
        for color in world.BASE_COLORS:
            asked = dataclasses.replace(scene, color=color)
            assert not world.judge(np.asarray(image), asked).color, (caption, color)
    for image, caption in world.samples(200, seed=4):
        scene = dataclasses.replace(world.Scene.parse(caption), color="purple")
        assert not world.judge(np.asarray(image), scene).color, caption


def test_judge_decides_base_models_colors_as_before_purple(base_images, monkeypatch):
    """On images builtin:toy draws, the judge's verdicts are the same with purple in its palette
    and without it."""
    scenes = world.SCENES
    with_purple = [world.judge(image, s) for image, s in zip(base_images, scenes, strict=True)]
    monkeypatch.setattr(world, "COLORS", {c: world.COLORS[c] for c in world.BASE_COLORS})
    without = [world.judge(image, s) for image, s in zip(base_images, scenes, strict=True)]
    assert with_purple == without
    assert np.mean([v.color for v in without]) >= 0.9  # the images do show colors to judge


def test_scale_zero_draws_the_base_models_pixels(toy, base_images):
    prompts = [s.caption for s in world.SCENES]
    toy.set_adapters(["purple"], adapter_weights=[0.0])
    assert np.array_equal(draw(toy, prompts), base_images)
    toy.disable_lora()
    assert np.array_equal(draw(toy, prompts), base_images)
    toy.enable_lora()
    toy.set_adapters(["purple"], adapter_weights=[1.0])
    assert not np.array_equal(draw(toy, prompts[:8]), base_images[:8])


def test_builtin_adapter_is_no_model():
    assert "toy-purple" not in builtin_names()
    assert (builtin_adapter_path("toy-purple") / LORA_FILE).is_file()
    with pytest.raises(InputError, match=r"^model: builtin:toy-purple is an adapter for "):
        builtin_path("toy-purple")
    with pytest.raises(InputError, match=r"^lora: unknown builtin adapter 'toy'; known: "):
        builtin_adapter_path("toy")


def test_training_loop_saves_a_diffusers_lora_the_same_from_the_same_seed(tmp_path):
    """A few steps of the training loop, twice: the same bytes, in diffusers' LoRA format, which
    load_lora_weights loads into builtin:toy and set_adapters weighs."""
    small = {"steps": 2, "batch": 4, "instances": 8, "priors_per_scene": 1, "prior_steps": 2}
    train_toy_purple(tmp_path / "a", **small)
    train_toy_purple(tmp_path / "b", **small)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [LORA_FILE]
    assert (tmp_path / "a" / LORA_FILE).read_bytes() == (tmp_path / "b" / LORA_FILE).read_bytes()
    with safe_open(tmp_path / "a" / LORA_FILE, "pt") as f:
        keys = list(f.keys())
    # diffusers' own key names (peft's lora_A/lora_B converted to lora.down/lora.up)
    assert keys and all(
        k.startswith("unet.") and (".lora.down." in k or ".lora.up." in k) for k in keys
    )
    pipe = toy_pipeline()
    pipe.load_lora_weights(tmp_path / "a", adapter_name="purple")
    pipe.set_adapters(["purple"], adapter_weights=[0.5])
    assert pipe.get_active_adapters() == ["purple"]
    assert np.isfinite(draw(pipe, ["a small purple square on the left"])).all()


def test_purple_jobs_ask_every_purple_scene_and_every_base_scene():
    """jobs/purple.yaml and jobs/purple-prior.yaml, which the README's adapter figures come from."""
    scales = [("builtin:toy-purple", s) for s in (0.25, 0.5, 1.0)]
    for name, scenes, settings in (
        ("purple", world.PURPLE_SCENES, [(None, None), *scales]),
        ("purple-prior", world.SCENES, [(None, None), scales[-1]]),
    ):
        spec = load_spec(REPO / "jobs" / f"{name}.yaml")
        assert spec.sweep.lora_settings == settings
        prompts = load_prompts(spec.prompts).frame
        assert sorted(prompts["prompt"]) == sorted(s.caption for s in scenes)
