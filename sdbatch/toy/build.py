"""Build the shipped files of every builtin model, from a fixed seed, into the package.

`tiny`, `tiny-clip` and `tiny-dinov2` are the real classes at toy size with fixed random weights
(seconds); `toy-clip` and `toy` are trained on the shapes world by `sdbatch.toy.train`, the
adapter `toy-purple` by `sdbatch.toy.lora`, and toy's inpainting and depth-to-image checkpoints
`toy-inpaint` and `toy-depth` by `sdbatch.toy.tasks` from the shipped toy (minutes each):

    python -m sdbatch.toy.build tiny
    python -m sdbatch.toy.build tiny-clip
    python -m sdbatch.toy.build tiny-dinov2
    python -m sdbatch.toy.build toy-clip      # the same as python -m sdbatch.toy.train toy-clip
    python -m sdbatch.toy.build toy
    python -m sdbatch.toy.build toy-purple
    python -m sdbatch.toy.build toy-inpaint   # after toy: it copies toy's VAE and text encoder
    python -m sdbatch.toy.build toy-depth
"""

from __future__ import annotations

import argparse
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from sdbatch.builtin import MODELS_DIR
from sdbatch.toy.components import make_byte_tokenizer, make_clip, save_sd_pipeline
from sdbatch.toy.lora import train_toy_purple
from sdbatch.toy.tasks import train_toy_depth, train_toy_inpaint
from sdbatch.toy.train import train_toy, train_toy_clip


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


def build_tiny_dinov2(destination: Path, seed: int = 0) -> None:
    """Build `builtin:tiny-dinov2` into `destination` as safetensors: a `Dinov2Model` and the
    image processor facebook/dinov2-* ship (BiT's: shortest edge, center crop, bicubic, ImageNet
    mean and std), both at 32 px instead of 224."""
    import torch
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model
    from transformers.image_utils import (
        IMAGENET_DEFAULT_MEAN,
        IMAGENET_DEFAULT_STD,
        PILImageResampling,
    )

    torch.manual_seed(seed)
    model = Dinov2Model(
        Dinov2Config(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            mlp_ratio=2,
            image_size=32,
            patch_size=8,
        )
    )
    processor = BitImageProcessorPil(
        size={"shortest_edge": 36},  # the hub models' 256 -> 224 ratio
        crop_size={"height": 32, "width": 32},
        resample=PILImageResampling.BICUBIC,
        image_mean=IMAGENET_DEFAULT_MEAN,
        image_std=IMAGENET_DEFAULT_STD,
    )
    if destination.exists():
        shutil.rmtree(destination)
    model.save_pretrained(destination, safe_serialization=True)
    processor.save_pretrained(destination)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "tiny": build_tiny,
    "tiny-clip": build_tiny_clip,
    "tiny-dinov2": build_tiny_dinov2,
    "toy-clip": train_toy_clip,
    "toy": train_toy,
    "toy-purple": train_toy_purple,
    "toy-inpaint": train_toy_inpaint,
    "toy-depth": train_toy_depth,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Rebuild a builtin model's shipped files.")
    parser.add_argument("name", choices=sorted(BUILDERS))
    parser.add_argument("--dest", type=Path, help="folder to write (default: the package's own)")
    args = parser.parse_args(argv)
    destination = args.dest or MODELS_DIR / args.name
    began = time.perf_counter()
    BUILDERS[args.name](destination)
    print(f"{destination} ({time.perf_counter() - began:.0f} s)")


if __name__ == "__main__":
    main()
