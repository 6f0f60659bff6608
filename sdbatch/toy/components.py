"""The parts the builtin models are made of, with the real diffusers and transformers classes: a
byte-level CLIP tokenizer that needs no vocabulary from the hub, Stable Diffusion 1.x's scheduler,
a CLIP model of any size, and a pipeline saved with `save_pretrained` (safetensors)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any


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
