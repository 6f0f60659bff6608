"""Builtin models: `builtin:NAME` names the model folder shipped inside the package, which loads
through `from_pretrained` like any checkpoint.

    tiny, tiny-clip   a Stable Diffusion pipeline and a CLIPModel + CLIPProcessor with the real
                      classes at toy size and fixed random weights: noise, for fast plumbing tests
    toy, toy-clip     the same classes trained on the shapes world (`sdbatch.toy`): a pipeline
                      that draws what it is asked for, and its CLIP; the demo's models
    tiny-dinov2       a Dinov2Model and its image processor, toy size, fixed random weights: the
                      `fid.features: dinov2` extractor in tests

`sdbatch.toy.build` makes their files.
"""

from __future__ import annotations

from pathlib import Path

from sdbatch.errors import InputError

MODELS_DIR = Path(__file__).parent / "models"
PREFIX = "builtin:"


def builtin_names() -> list[str]:
    """The builtin models: the folders shipped in the package."""
    return sorted(p.name for p in MODELS_DIR.iterdir() if p.is_dir())


def builtin_path(name: str, field: str = "model") -> Path:
    """The folder of builtin model `name` (`field` names the spec field in errors).

    Raises:
        InputError: no such builtin model.
    """
    names = builtin_names()
    if name not in names:
        raise InputError(f"{field}: unknown builtin model {name!r}; known: {', '.join(names)}")
    return MODELS_DIR / name
