"""Train `builtin:toy-inpaint` and `builtin:toy-depth`: builtin:toy made into the dedicated
checkpoints a user would download for inpainting (a 9-channel UNet, as Stable Diffusion 1.5's
inpainting model) and for depth-to-image (a 5-channel UNet, as Stable Diffusion 2's depth model),
and the tiny depth estimator that lets depth2img run without a depth map.

Both UNets are toy's own with a wider input convolution: latents, then the mask (1) and the
masked image's latents (4) for inpainting, the depth (1) for depth; the order is the one diffusers'
pipelines concatenate. The new input weights start at zero, so training starts from toy itself (as
SD inpainting was made from SD 1.2), then the noise-prediction loss is trained on world scenes,
captions dropped 10% of the time as for toy:

- inpaint: each scene with one mask: the object's area together with another shape's at the same
  place, grown to whole latent cells (what `jobs/inpaint-prompts.parquet` asks), a random box or
  an edge strip (outpainting's new border), or the whole image (which is text-to-image).
- depth: the scene's depth map (`world.depth_map`) as the pipeline's `prepare_depth_map` gives it
  to the UNet (bicubic to the latent size, scaled to [-1, 1]); captions name the size and the
  position or leave them out, so that the depth map alone can place and size the object.
- depth estimator: a `DPTForDepthEstimation` (ViT, 32 px, patch 4) trained with a squared error
  on world images to their depth / 255, saved with its `DPTImageProcessor` (at 32 px).

The autoencoder, text encoder, tokenizer and scheduler are the base's files, copied byte for byte.

Reproduce the shipped folders (from a fixed seed; minutes on 2 CPU cores, see the README):
    python -m sdbatch.toy.build toy-inpaint
    python -m sdbatch.toy.build toy-depth
"""

from __future__ import annotations

import dataclasses
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from sdbatch.builtin import builtin_path
from sdbatch.schedulers import make_scheduler
from sdbatch.toy import world
from sdbatch.toy.train import denoising_loss, image_tensors

# One thread, as toy-purple: the same weights from the same seed, and no two threads waiting on
# each other on a busy 2-core machine.
THREADS = 1
SHARED = ("vae", "text_encoder", "tokenizer", "scheduler")  # the base's files, copied as they are
# Judging the shipped models: euler, as the demo draws toy's best-judged images.
JUDGE_SCHEDULER, JUDGE_STEPS, JUDGE_GUIDANCE = "euler", 20, 4.0


def widen(unet: Any, in_channels: int) -> Any:
    """A copy of `unet` taking `in_channels` inputs: the first ones its own, the rest weighted zero
    (so its predictions are unchanged until training moves them)."""
    import torch
    from diffusers import UNet2DConditionModel

    wide = UNet2DConditionModel.from_config({**unet.config, "in_channels": in_channels})
    state = unet.state_dict()
    weight = state["conv_in.weight"]
    extra = weight.new_zeros(weight.shape[0], in_channels - weight.shape[1], *weight.shape[2:])
    state["conv_in.weight"] = torch.cat([weight, extra], dim=1)
    wide.load_state_dict(state)
    return wide


def training_mask(scene: world.Scene, seed: int, rng: random.Random) -> np.ndarray:
    """A mask to train inpainting on (H x W, 255 = repaint): half the time the object's area with
    another shape's (as the inpaint job's masks), else a random box or edge strip, or everything."""
    side, cell = world.SIZE, world.LATENT_CELL
    kind = rng.random()
    if kind < 0.5:
        other = dataclasses.replace(scene, shape=rng.choice(world.SHAPES))
        both = np.maximum(
            np.asarray(world.object_mask(scene, seed)), np.asarray(world.object_mask(other, seed))
        )
        return world.cover(both)
    mask = np.zeros((side, side), dtype=np.uint8)
    if kind < 0.7:
        w, h = (cell * rng.randint(2, side // cell) for _ in range(2))
        x, y = cell * rng.randint(0, (side - w) // cell), cell * rng.randint(0, (side - h) // cell)
        mask[y : y + h, x : x + w] = 255
    elif kind < 0.9:
        width = cell * rng.randint(1, side // cell // 2)
        edge = rng.choice(("top", "right", "bottom", "left"))
        strip = {
            "top": np.s_[:width],
            "bottom": np.s_[-width:],
            "left": np.s_[:, :width],
            "right": np.s_[:, -width:],
        }
        mask[strip[edge]] = 255
    else:
        mask[:] = 255
    return mask


def depth_condition(depth: Any, latent_size: int) -> Any:
    """Depth maps (N x H x W) as `StableDiffusionDepth2ImgPipeline.prepare_depth_map` hands them
    to the UNet: bicubic to the latent size, each scaled to [-1, 1] (N x 1 x h x w)."""
    import torch

    depth = torch.nn.functional.interpolate(
        depth.unsqueeze(1), size=(latent_size, latent_size), mode="bicubic", align_corners=False
    )
    low = torch.amin(depth, dim=[1, 2, 3], keepdim=True)
    high = torch.amax(depth, dim=[1, 2, 3], keepdim=True)
    return 2.0 * (depth - low) / (high - low) - 1.0


def _load_base(base: Path | None) -> tuple[Any, Path]:
    from diffusers import StableDiffusionPipeline

    folder = base or builtin_path("toy")
    pipe = StableDiffusionPipeline.from_pretrained(folder, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False)
    return pipe, folder


def _encode(pipe: Any, pixels: Any, generator: Any = None) -> Any:
    """Scaled latents of `pixels`: the posterior's mean (as toy trained on), or with `generator`
    a sample of it (as the inpainting pipeline encodes the masked image)."""
    import torch

    with torch.no_grad():
        parts = []
        for i in range(0, len(pixels), 500):
            posterior = pipe.vae.encode(pixels[i : i + 500]).latent_dist
            parts.append(posterior.mean if generator is None else posterior.sample(generator))
    return torch.cat(parts) * pipe.vae.config.scaling_factor


def _fine_tune(
    unet: Any,
    pipe: Any,
    latents: Any,
    condition: Any,
    captions: list[str],
    steps: int,
    batch: int,
    learning_rate: float,
    seed: int,
    desc: str,
) -> None:
    """Train every weight of `unet` with the noise-prediction loss, `condition` after the noisy
    latents' channels."""
    import torch
    from diffusers import DDPMScheduler

    texts = ["", *sorted(set(captions))]
    with torch.no_grad():
        states, _ = pipe.encode_prompt(texts, "cpu", 1, do_classifier_free_guidance=False)
    ids = torch.tensor([texts.index(c) for c in captions])
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    unet.requires_grad_(True)
    unet.train()
    for _ in tqdm(range(steps), desc=desc, unit="step"):
        rows = torch.randint(0, len(latents), (batch,), generator=generator)
        loss = denoising_loss(
            unet, noise_scheduler, latents[rows], ids[rows], states, generator, condition[rows]
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    unet.eval()
    unet.requires_grad_(False)


def _save(pipe: Any, destination: Path, base: Path) -> None:
    if destination.exists():
        shutil.rmtree(destination)
    pipe.save_pretrained(destination, safe_serialization=True)
    for part in SHARED:
        shutil.rmtree(destination / part)
        shutil.copytree(base / part, destination / part)


def train_toy_inpaint(
    destination: Path,
    base: Path | None = None,
    steps: int = 1500,
    seed: int = 0,
    batch: int = 32,
    samples: int = 6000,
    learning_rate: float = 2e-3,
) -> None:
    """Train `builtin:toy-inpaint` from `base` (default `builtin:toy`) into `destination`."""
    import torch
    from diffusers import StableDiffusionInpaintPipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    torch.manual_seed(seed)
    pipe, base = _load_base(base)

    # 1. scenes, one mask each; the masked image as the pipeline makes it (masked pixels 0)
    pixels, captions = image_tensors(samples, seed)
    rng = random.Random(seed)
    masks = np.stack([training_mask(s, k, rng) for s, k in world.draws(samples, seed)])
    mask = torch.from_numpy(masks > 127).float().unsqueeze(1)
    latents = _encode(pipe, pixels)
    masked = _encode(pipe, pixels * (mask < 0.5), torch.Generator().manual_seed(seed))
    small = torch.nn.functional.interpolate(mask, size=latents.shape[-2:])

    # 2. toy's UNet, 9 inputs, fine-tuned
    unet = widen(pipe.unet, 9)
    condition = torch.cat([small, masked], dim=1)
    _fine_tune(
        unet, pipe, latents, condition, captions, steps, batch, learning_rate, seed, "toy-inpaint"
    )
    torch.set_num_threads(threads)

    # 3. save as an inpainting pipeline
    inpaint = StableDiffusionInpaintPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=unet,
        scheduler=pipe.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    _save(inpaint, destination, base)


def make_depth_estimator() -> tuple[Any, Any]:
    """A freshly initialised tiny `DPTForDepthEstimation` and its `DPTImageProcessor`, 32 px."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessorPil

    model = DPTForDepthEstimation(
        DPTConfig(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=world.SIZE,
            patch_size=4,
            backbone_out_indices=[0, 1, 2, 3],
            neck_hidden_sizes=[16, 32, 32, 32],
            reassemble_factors=[2, 1, 0.5, 0.25],
            fusion_hidden_size=32,
            head_in_index=-1,
        )
    )
    processor = DPTImageProcessorPil(size={"height": world.SIZE, "width": world.SIZE})
    return model, processor


def train_depth_estimator(
    steps: int = 300, seed: int = 0, batch: int = 32, samples: int = 4000
) -> tuple[Any, Any]:
    """The depth estimator trained on world images to their depth maps / 255."""
    import torch

    torch.manual_seed(seed)
    model, processor = make_depth_estimator()
    pairs = world.draws(samples, seed)
    images = [world.render(s, k) for s, k in pairs]
    pixels = processor(images=images, return_tensors="pt").pixel_values
    depth = torch.from_numpy(np.stack([np.asarray(world.depth_map(s, k)) for s, k in pairs]))
    depth = depth.float() / 255
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(steps), desc="toy-depth estimator", unit="step"):
        rows = torch.randint(0, samples, (batch,), generator=generator)
        predicted = model(pixel_values=pixels[rows]).predicted_depth
        # The head predicts at twice the input's size; averaged back to the map's own pixels.
        scale = predicted.shape[-1] // world.SIZE
        predicted = torch.nn.functional.avg_pool2d(predicted.unsqueeze(1), scale).squeeze(1)
        loss = torch.nn.functional.mse_loss(predicted, depth[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    return model, processor


def train_toy_depth(
    destination: Path,
    base: Path | None = None,
    steps: int = 1000,
    estimator_steps: int = 300,
    seed: int = 0,
    batch: int = 32,
    samples: int = 6000,
    learning_rate: float = 1e-3,
) -> None:
    """Train `builtin:toy-depth` from `base` (default `builtin:toy`) into `destination`."""
    import torch
    from diffusers import StableDiffusionDepth2ImgPipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    torch.manual_seed(seed)
    pipe, base = _load_base(base)

    # 1. scenes, their depth maps as the UNet sees them, captions in every form
    pixels, _ = image_tensors(samples, seed)
    pairs = world.draws(samples, seed)
    rng = random.Random(seed)
    forms = [(True, True)] * 2 + [(False, True), (True, False), (False, False)]
    captions = [s.describe(*rng.choice(forms)) for s, _ in pairs]
    depth = torch.from_numpy(np.stack([np.asarray(world.depth_map(s, k)) for s, k in pairs]))
    latents = _encode(pipe, pixels)
    condition = depth_condition(depth.float(), latents.shape[-1])

    # 2. toy's UNet, 5 inputs, fine-tuned; the depth estimator
    unet = widen(pipe.unet, 5)
    _fine_tune(
        unet, pipe, latents, condition, captions, steps, batch, learning_rate, seed, "toy-depth"
    )
    estimator, processor = train_depth_estimator(estimator_steps, seed)
    torch.set_num_threads(threads)

    # 3. save as a depth-to-image pipeline
    depth2img = StableDiffusionDepth2ImgPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=unet,
        scheduler=pipe.scheduler,
        depth_estimator=estimator,
        feature_extractor=processor,
    )
    _save(depth2img, destination, base)


def _judge_kwargs(count: int, seed: int) -> dict[str, Any]:
    import torch

    return {
        "height": world.SIZE,
        "width": world.SIZE,
        "num_inference_steps": JUDGE_STEPS,
        "guidance_scale": JUDGE_GUIDANCE,
        "generator": [torch.Generator().manual_seed(seed + i) for i in range(count)],
        "output_type": "np",
    }


def _shares(verdicts: list[world.Judgement]) -> dict[str, float]:
    """The share of images each attribute is right in, and every one of them ("every")."""
    table = np.array([dataclasses.astuple(v) for v in verdicts], dtype=bool)
    shares = {
        f.name: float(table[:, i].mean()) for i, f in enumerate(dataclasses.fields(world.Judgement))
    }
    return {"every": float(table.all(axis=1).mean()), **shares}


def judge_inpaint(
    folder: Path, count: int = 24, seed: int = 0, strength: float = 1.0, task: str = "inpaint"
) -> dict[str, float]:
    """An inpainting model on the inpaint job's edits (another shape, its area masked), or with
    `task="outpaint"` on the outpaint job's (the scene's cut-off right 8 columns to paint, the
    canvas extended with the background color): the share of results the judge finds right for
    the asked scene, per attribute and in all ("every"), and the mean PSNR (dB) against the source
    where the mask keeps it ("kept_psnr")."""
    from diffusers import AutoPipelineForInpainting
    from PIL import Image

    pipe = AutoPipelineForInpainting.from_pretrained(folder, use_safetensors=True)
    pipe.scheduler = make_scheduler(JUDGE_SCHEDULER, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    edits = world.edits(task, count)
    sources = [world.render(e.source, e.seed) for e in edits]
    if task == "outpaint":
        strip = Image.new("RGB", (world.SIZE - world.OUTPAINT_KEEP, world.SIZE), world.BACKGROUND)
        for source in sources:
            source.paste(strip, (world.OUTPAINT_KEEP, 0))
        mask = np.zeros((world.SIZE, world.SIZE), dtype=np.uint8)
        mask[:, world.OUTPAINT_KEEP :] = 255
        masks = [Image.fromarray(mask) for _ in edits]
    else:
        masks = [world.inpaint_mask(e) for e in edits]
    drawn = pipe(
        [e.target.caption for e in edits],
        image=sources,
        mask_image=masks,
        strength=strength,
        **_judge_kwargs(count, seed),
    ).images
    results = np.round(drawn * 255).astype(np.uint8)
    psnr = []
    for result, source, mask in zip(results, sources, masks, strict=True):
        kept = np.asarray(mask) == 0
        error = np.mean((result[kept].astype(float) - np.asarray(source)[kept]) ** 2)
        psnr.append(10 * np.log10(255**2 / max(error, 1e-10)))
    verdicts = [world.judge(r, e.target) for r, e in zip(results, edits, strict=True)]
    return {**_shares(verdicts), "kept_psnr": float(np.mean(psnr))}


def judge_depth(
    folder: Path,
    count: int = 24,
    seed: int = 0,
    strength: float = 1.0,
    estimate: bool = False,
    named: bool = True,
) -> dict[str, float]:
    """A depth-to-image model on the depth2img job's edits (another color): the share of results
    the judge finds right for the asked scene (its color from the prompt, its shape, size and
    position as the depth map has them), per attribute and in all ("every").

    Args:
        estimate: leave the depth map out, so the pipeline's depth estimator makes it.
        named: prompts name the size and position; else only the color and shape ("a blue
            circle"), so that the object's size and place can come from the depth map alone.
    """
    import torch
    from diffusers import StableDiffusionDepth2ImgPipeline

    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(folder, use_safetensors=True)
    pipe.scheduler = make_scheduler(JUDGE_SCHEDULER, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    edits = world.edits("depth2img", count)
    depth = np.stack([np.asarray(world.depth_map(e.source, e.seed)) for e in edits])
    drawn = pipe(
        [e.target.describe(size=named, position=named) for e in edits],
        image=[world.render(e.source, e.seed) for e in edits],
        depth_map=None if estimate else torch.from_numpy(depth).float(),
        strength=strength,
        **_judge_kwargs(count, seed),
    ).images
    results = np.round(drawn * 255).astype(np.uint8)
    return _shares([world.judge(r, e.target) for r, e in zip(results, edits, strict=True)])
