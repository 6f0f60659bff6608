"""Train the shapes-world models that ship as `builtin:toy-clip` and `builtin:toy`.

Both use the real classes and are saved with `save_pretrained` (safetensors), so they load through
the same `from_pretrained` path as real checkpoints:

- toy-clip: a `CLIPModel` (text and vision towers, the project's byte-level tokenizer), trained
  contrastively on (image, caption) pairs of `sdbatch.world` (CLIP's symmetric InfoNCE loss).
- toy: a Stable Diffusion pipeline: an `AutoencoderKL` trained to reconstruct world images of
  every color, purple included (the image space, as SD's autoencoder covers colors its captions
  never name), then a `UNet2DConditionModel` trained with the usual noise-prediction loss on the
  latents of base-color images, conditioned through cross-attention on toy-clip's frozen text
  encoder, with 10% of captions dropped (empty) so that classifier-free guidance works; the
  scheduler is Stable Diffusion 1.x's. The UNet and the text encoder never see purple: that is the
  concept `builtin:toy-purple` teaches.

Reproduce the shipped weights (from a fixed seed; about 21 minutes on 2 CPU cores, see the
README):
    python -m sdbatch.toy.train toy-clip
    python -m sdbatch.toy.train toy
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sdbatch.builtin import builtin_path
from sdbatch.toy import world
from sdbatch.toy.components import make_clip, save_sd_pipeline

CAPTION_DROPOUT = 0.1
# One thread: float sums split across threads could give other weights with another count, and
# on a busy 2-core machine two threads wait on each other (one step took 20x as long).
THREADS = 1


def image_tensors(count: int, seed: int, scenes: list[world.Scene] = world.SCENES):
    """`count` world pairs of `scenes` as a float tensor in [-1, 1] (N x 3 x H x W) and their
    captions."""
    import torch

    pairs = world.samples(count, seed, scenes=scenes)
    pixels = np.stack([np.asarray(image) for image, _ in pairs])
    tensor = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    return tensor, [caption for _, caption in pairs]


def denoising_loss(unet, noise_scheduler, clean, ids, states, generator, condition=None):
    """Stable Diffusion's training loss on `clean` latents captioned `ids` (rows of `states`,
    row 0 the empty caption): captions dropped 10% of the time, so that the unconditional
    prediction classifier-free guidance subtracts is trained too; noise at a random timestep;
    the prediction's squared error against that noise. `condition` (N x C x h x w: an inpainting
    UNet's mask and masked image, a depth UNet's depth) is put after the noisy latents'
    channels, as the pipelines put it."""
    import torch

    count = len(clean)
    dropped = torch.rand(count, generator=generator) < CAPTION_DROPOUT
    ids = torch.where(dropped, torch.zeros_like(ids), ids)
    noise = torch.randn(clean.shape, generator=generator)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (count,), generator=generator)
    noisy = noise_scheduler.add_noise(clean, noise, t)
    if condition is not None:
        noisy = torch.cat([noisy, condition], dim=1)
    prediction = unet(noisy, t, encoder_hidden_states=states[ids]).sample
    return torch.nn.functional.mse_loss(prediction, noise)


def _required(text: str, codes: dict[str, dict[str, int]]) -> list[int]:
    """The attribute codes a caption names, -1 for the ones it leaves out."""
    words = text.split()
    return [next((i for value, i in codes[a].items() if value in words), -1) for a in codes]


def train_toy_clip(
    destination: Path, steps: int = 3000, seed: int = 0, batch: int = 128, samples: int = 20_000
) -> None:
    """Train and save `builtin:toy-clip` (CLIPModel + CLIPProcessor) into `destination`."""
    import torch

    torch.manual_seed(seed)
    model, processor = make_clip(
        width=64, layers=3, image_size=world.SIZE, patch_size=4, projection=64
    )
    tokenizer = processor.tokenizer
    images, captions = image_tensors(samples, seed)
    # CLIP's normalisation, applied once to the whole set (the processor does the same at use).
    mean = torch.tensor(processor.image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1)
    pixels = ((images + 1) / 2 - mean) / std
    scenes = [world.Scene.parse(c) for c in captions]
    # Captions name all four attributes or leave size and/or position out, so that short prompts
    # ("a red circle") are as familiar as full ones. Each text is a set of required attributes.
    forms = [(True, True), (False, True), (True, False), (False, False)]
    texts = sorted({s.describe(*form) for s in world.SCENES for form in forms})
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    codes = {a: {v: i for i, v in enumerate(vs)} for a, vs in world.ATTRIBUTES_OF.items()}
    image_attrs = torch.tensor([[codes[a][getattr(s, a)] for a in codes] for s in scenes])
    text_attrs = torch.tensor([_required(t, codes) for t in texts])

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(steps), desc="toy-clip", unit="step"):
        rows = torch.randint(0, len(pixels), (batch,), generator=generator)
        form = torch.randint(0, len(forms), (batch,), generator=generator)
        ids = torch.tensor(
            [
                texts.index(scenes[r].describe(*forms[f]))
                for r, f in zip(rows.tolist(), form.tolist(), strict=True)
            ]
        )
        image = model.get_image_features(pixel_values=pixels[rows]).pooler_output
        text = model.get_text_features(
            input_ids=tokens["input_ids"][ids], attention_mask=tokens["attention_mask"][ids]
        ).pooler_output
        image = torch.nn.functional.normalize(image, dim=-1)
        text = torch.nn.functional.normalize(text, dim=-1)
        logits = image @ text.T * model.logit_scale.exp()
        # A pair is positive when the text's named attributes all hold in the image (-1: unnamed).
        required = text_attrs[ids]
        holds = (required[None, :, :] == image_attrs[rows][:, None, :]) | (required[None] < 0)
        targets = holds.all(dim=2).float()
        loss = (
            torch.nn.functional.cross_entropy(logits, targets / targets.sum(1, keepdim=True))
            + torch.nn.functional.cross_entropy(logits.T, (targets / targets.sum(0)).T)
        ) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    destination.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(destination, safe_serialization=True)
    processor.save_pretrained(destination)


def train_toy(
    destination: Path,
    clip: Path | None = None,
    vae_steps: int = 2000,
    unet_steps: int = 4000,
    seed: int = 0,
    batch: int = 64,
    samples: int = 20_000,
) -> None:
    """Train and save `builtin:toy`, a Stable Diffusion pipeline, into `destination`."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        UNet2DConditionModel,
    )
    from transformers import AutoTokenizer, CLIPTextModel

    clip = clip or builtin_path("toy-clip")
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, captions = image_tensors(samples, seed + 1)

    # 1. the autoencoder: 32 px images <-> 4 x 8 x 8 latents (a 4x downsampling keeps the UNet
    #    cheap enough to train on 2 CPU cores)
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=world.SIZE,
    )
    # An autoencoder of the base colors alone decodes a purple circle as a green one, and no
    # adapter on the UNet could then draw purple.
    every_color, _ = image_tensors(samples, seed + 2, world.scenes_of(tuple(world.COLORS)))
    # One-cycle decay: at a constant rate the five colors' reconstructions ended 3x as far off.
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=vae_steps)
    vae.train()
    for _ in tqdm(range(vae_steps), desc="toy vae", unit="step"):
        x = every_color[torch.randint(0, len(every_color), (batch // 2,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=None)
        reconstruction = vae.decode(z).sample
        # A light KL term keeps the latents close to a unit Gaussian, as diffusion expects.
        loss = torch.nn.functional.mse_loss(reconstruction, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    vae.eval()
    with torch.no_grad():
        latents = torch.cat(
            [vae.encode(images[i : i + 500]).latent_dist.mean for i in range(0, len(images), 500)]
        )
    # Stable Diffusion's convention: scale latents to unit variance (0.18215 for SD 1.x).
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    latents = latents * vae.config.scaling_factor

    # 2. the text conditioning: toy-clip's frozen text encoder, once per distinct caption
    tokenizer = AutoTokenizer.from_pretrained(clip)
    text_encoder = CLIPTextModel.from_pretrained(clip, use_safetensors=True).eval()
    texts = ["", *sorted(set(captions))]
    with torch.no_grad():
        tokens = tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt")
        states = text_encoder(tokens["input_ids"]).last_hidden_state
    index = torch.tensor([texts.index(c) for c in captions])

    # 3. the denoiser: noise prediction on the latents, captions dropped 10% of the time
    unet = UNet2DConditionModel(
        sample_size=world.SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_encoder.config.hidden_size,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    noise_scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-3, total_steps=unet_steps)
    unet.train()
    for _ in tqdm(range(unet_steps), desc="toy unet", unit="step"):
        rows = torch.randint(0, len(latents), (batch,), generator=generator)
        loss = denoising_loss(unet, noise_scheduler, latents[rows], index[rows], states, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    unet.eval()

    torch.set_num_threads(threads)

    # 4. save as a Stable Diffusion pipeline with SD 1.x's scheduler config
    save_sd_pipeline(destination, vae, text_encoder, tokenizer, unet)


def zero_shot_accuracy(folder: Path, count: int = 1000, seed: int = 99) -> dict[str, float]:
    """Toy CLIP, zero-shot: the share of rendered images whose best-matching caption among
    "a {color} {shape}" (the colors it was trained on) names their color, and their shape."""
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(folder, use_safetensors=True).eval()
    processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    pairs = world.samples(count, seed)
    labels = [(c, s) for c in world.BASE_COLORS for s in world.SHAPES]
    with torch.no_grad():
        pixels = processor(images=[np.asarray(i) for i, _ in pairs], return_tensors="pt")
        image = model.get_image_features(**pixels).pooler_output
        tokens = tokenizer([f"a {c} {s}" for c, s in labels], padding=True, return_tensors="pt")
        text = model.get_text_features(**tokens).pooler_output
    image = torch.nn.functional.normalize(image, dim=-1)
    text = torch.nn.functional.normalize(text, dim=-1)
    best = [labels[i] for i in (image @ text.T).argmax(dim=1).tolist()]
    truth = [world.Scene.parse(caption) for _, caption in pairs]
    return {
        "color": float(np.mean([b[0] == t.color for b, t in zip(best, truth, strict=True)])),
        "shape": float(np.mean([b[1] == t.shape for b, t in zip(best, truth, strict=True)])),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train a shapes-world model (see module docs).")
    parser.add_argument("name", choices=["toy-clip", "toy"])
    parser.add_argument("--dest", type=Path, help="folder to write (default: the package's own)")
    parser.add_argument("--steps", type=int, help="training steps (toy: of the UNet)")
    parser.add_argument("--vae-steps", type=int, default=2000, help="toy: autoencoder steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    destination = args.dest or builtin_path(args.name)
    began = time.perf_counter()
    if args.name == "toy-clip":
        train_toy_clip(destination, args.steps or 3000, args.seed)
    else:
        train_toy(destination, None, args.vae_steps, args.steps or 4000, args.seed)
    print(f"{destination} ({time.perf_counter() - began:.0f} s)")


if __name__ == "__main__":
    main()
