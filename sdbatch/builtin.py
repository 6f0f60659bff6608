"""Builtin models and adapters: `builtin:NAME` names a folder shipped inside the package. A model
loads through `from_pretrained` like any checkpoint, an adapter through `load_lora_weights`.

    tiny, tiny-clip   a Stable Diffusion pipeline and a CLIPModel + CLIPProcessor with the real
                      classes at toy size and fixed random weights: noise, for fast plumbing tests
    toy, toy-clip     the same classes trained on the shapes world (`sdbatch.toy`): a pipeline
                      that draws what it is asked for, and its CLIP; the demo's models
    tiny-dinov2       a Dinov2Model and its image processor, toy size, fixed random weights: the
                      `fid.features: dinov2` extractor in tests
    toy-purple        an adapter: a LoRA (diffusers' format) that teaches toy the color purple
    toy-inpaint       toy as a StableDiffusionInpaintPipeline: a 9-channel UNet (latents, mask,
                      masked image) fine-tuned from toy's, toy's other parts as they are
    toy-depth         toy as a StableDiffusionDepth2ImgPipeline: a 5-channel UNet (latents,
                      depth) fine-tuned from toy's, and a tiny DPT depth estimator

`sdbatch.toy.build` makes their files.
"""

from __future__ import annotations

from pathlib import Path

from sdbatch.errors import InputError

MODELS_DIR = Path(__file__).parent / "models"
PREFIX = "builtin:"
# The builtin adapters, and the builtin model each was trained for.
ADAPTERS = {"toy-purple": "toy"}


def builtin_names() -> list[str]:
    """The builtin models: the folders shipped in the package, less the adapters."""
    return sorted(p.name for p in MODELS_DIR.iterdir() if p.is_dir() and p.name not in ADAPTERS)


def builtin_path(name: str, field: str = "model") -> Path:
    """The folder of builtin model `name` (`field` names the spec field in errors).

    Raises:
        InputError: no such builtin model.
    """
    if name in ADAPTERS:
        raise InputError(
            f"{field}: builtin:{name} is an adapter for builtin:{ADAPTERS[name]}, not a model"
        )
    names = builtin_names()
    if name not in names:
        raise InputError(f"{field}: unknown builtin model {name!r}; known: {', '.join(names)}")
    return MODELS_DIR / name


def builtin_adapter_path(name: str, field: str = "lora") -> Path:
    """The folder of builtin adapter `name`, which `pipe.load_lora_weights(folder)` reads.

    Raises:
        InputError: no such builtin adapter.
    """
    if name not in ADAPTERS:
        raise InputError(f"{field}: unknown builtin adapter {name!r}; known: {', '.join(ADAPTERS)}")
    return MODELS_DIR / name
