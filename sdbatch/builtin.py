"""Builtin models, shipped inside the package and loaded like any checkpoint (`from_pretrained`).

`builtin:tiny` is a Stable Diffusion pipeline with the real diffusers and transformers classes
(UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer) at toy size, with fixed random
weights. Its images are noise; it exists so that everything else can run on a laptop and in CI.

`builtin:tiny-clip` is a `CLIPModel` and `CLIPProcessor` at toy size (random weights, the same
byte-level tokenizer): evaluation loads it exactly as it loads openai/clip-vit-large-patch14.

`builtin:toy` and `builtin:toy-clip` are trained by `sdbatch.train` on the shapes world
(`sdbatch.world`): a Stable Diffusion pipeline that draws what it is asked for, and its CLIP.

Rebuild the shipped files (from a fixed seed; the toy models train for minutes):
    python -m sdbatch.builtin tiny
    python -m sdbatch.builtin tiny-clip
    python -m sdbatch.builtin toy-clip      # the same as python -m sdbatch.train toy-clip
    python -m sdbatch.builtin toy
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdbatch.errors import InputError

MODELS_DIR = Path(__file__).parent / "models"
PREFIX = "builtin:"


def builtin_path(name: str, field: str = "model") -> Path:
    """The folder of builtin model `name` (`field` names the spec field in errors).

    Raises:
        InputError: no such builtin model.
    """
    if name not in BUILDERS:
        raise InputError(f"{field}: unknown builtin model {name!r}; known: {', '.join(BUILDERS)}")
    return MODELS_DIR / name


def make_byte_tokenizer(max_length: int = 77):
    """A CLIP tokenizer over single bytes: CLIP's byte-level alphabet, no merges.

    It tokenizes any text (one token per character, so prompts over ~75 characters are truncated
    like long prompts in real CLIP) and needs no vocabulary from the hub.
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    symbols = alphabet + [a + "</w>" for a in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {s: i for i, s in enumerate(symbols)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def sd_scheduler() -> Any:
    """Stable Diffusion 1.x's scheduler, with its config as v1-5 ships it.

    `clip_sample: false` is not a PNDM parameter, but the other schedulers built `from_config`
    read it: without it DDIM and DDPM clip predicted latents to [-1, 1] and ruin every image.
    """
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )
    scheduler.register_to_config(clip_sample=False)
    return scheduler


def build_tiny(destination: Path, seed: int = 0) -> None:
    """Build `builtin:tiny` and save it with `save_pretrained` (safetensors) into `destination`."""
    import torch
    from diffusers import (
        AutoencoderKL,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = make_byte_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    # Four VAE levels give Stable Diffusion's 8x latent downsampling at a fraction of the size.
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=64,
    )
    save_sd_pipeline(destination, vae, text_encoder, tokenizer, unet)


def save_sd_pipeline(
    destination: Path,
    vae: Any,
    text_encoder: Any,
    tokenizer: Any,
    unet: Any,
    safety_checker: Any = None,
    feature_extractor: Any = None,
) -> None:
    """Assemble a Stable Diffusion 1.x pipeline (its scheduler; a safety checker and its feature
    extractor only when given) and save it into `destination`, replacing what was there, as
    safetensors."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd_scheduler(),
        safety_checker=safety_checker,
        feature_extractor=feature_extractor,
        requires_safety_checker=safety_checker is not None,
    )
    if destination.exists():
        shutil.rmtree(destination)
    pipe.save_pretrained(destination, safe_serialization=True)


def build_tiny_clip(destination: Path, seed: int = 2) -> None:
    """Build `builtin:tiny-clip` (CLIPModel + CLIPProcessor) into `destination` as safetensors.

    Seed 2 is the first whose random weights give positive, varied image-text cosines: with
    most seeds every CLIP score is clipped to 0, which would hide a broken scorer.
    """
    import torch

    torch.manual_seed(seed)
    model, processor = make_clip(width=32, layers=2, image_size=32, patch_size=8, projection=16)
    if destination.exists():
        shutil.rmtree(destination)
    model.save_pretrained(destination, safe_serialization=True)
    processor.save_pretrained(destination)


def make_clip(width: int, layers: int, image_size: int, patch_size: int, projection: int) -> Any:
    """A freshly initialised `CLIPModel` and its `CLIPProcessor` (the byte tokenizer, and CLIP's
    own image preprocessing at `image_size`), both towers `width` wide and `layers` deep."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = make_byte_tokenizer()
    tower = {
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
    }
    model = CLIPModel(
        CLIPConfig(
            text_config={
                **tower,
                "vocab_size": len(tokenizer),
                "max_position_embeddings": 77,
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            },
            vision_config={**tower, "image_size": image_size, "patch_size": patch_size},
            projection_dim=projection,
        )
    )
    images = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    return model, CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def train_toy_clip(destination: Path) -> None:
    """`builtin:toy-clip`: trained on the shapes world by sdbatch.train (minutes on a CPU)."""
    from sdbatch import train

    train.train_toy_clip(destination)


def train_toy(destination: Path) -> None:
    """`builtin:toy`: trained on the shapes world by sdbatch.train, on toy-clip's text encoder."""
    from sdbatch import train

    train.train_toy(destination)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "tiny": build_tiny,
    "tiny-clip": build_tiny_clip,
    "toy-clip": train_toy_clip,
    "toy": train_toy,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Rebuild a builtin model's shipped files.")
    parser.add_argument("name", choices=sorted(BUILDERS))
    parser.add_argument("--dest", type=Path, help="folder to write (default: the package's own)")
    args = parser.parse_args(argv)
    destination = args.dest or builtin_path(args.name)
    BUILDERS[args.name](destination)
    print(destination)


if __name__ == "__main__":
    main()
