"""LoRA adapters: resolve a reference to one pinned safetensors file, and check, before any work
starts, that it fits each model it is swept with.

An adapter is a file in diffusers' LoRA format (what `save_lora_weights` writes:
``unet.<module>.lora_A.weight``, ``text_encoder.<module>.lora_B.weight``, ...), loaded in a worker
by `load_lora_weights`. The fit is checked from the file's header (key names and shapes, no
tensors read) against the model's components built from their configs on torch's meta device: no
base weights are loaded on the driver.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdbatch.builtin import PREFIX, builtin_adapter_path
from sdbatch.digests import file_digest
from sdbatch.errors import InputError, first_line
from sdbatch.models import HUB_ID, LIBRARIES, PICKLE_SUFFIXES, ModelSource, model_file

# The file name diffusers' save_lora_weights writes, and load_lora_weights looks for first.
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# A LoRA key's ending -> which factor it is: down (A: rank x in) or up (B: out x rank).
FACTORS = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
}
# Per-module values with no shape to check (kohya's alpha, DoRA's magnitudes).
IGNORED = (".alpha", ".lora_magnitude_vector")
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


@dataclass(frozen=True)
class AdapterSource:
    """A resolved adapter: where `load_lora_weights` finds it and what exactly it is."""

    ref: str  # as the spec wrote it
    location: str  # a local folder, or a hub repo id
    weight_name: str  # the .safetensors file in it
    revision: str | None  # the hub commit; None for a local one
    identity: str  # "sha256:..." of the file, or "hub:REPO@COMMIT/FILE"


def resolve_adapter(ref: str, field: str) -> AdapterSource:
    """Check an adapter reference and pin the one safetensors file it points to.

    Args:
        ref: ``builtin:NAME``, a local folder or ``.safetensors`` file, or a hub id.
        field: the spec field it came from (``sweep.lora[1].path``), for errors.

    Raises:
        InputError: no such builtin, file, folder or hub repo; no safetensors file in it, or
            several and none named pytorch_lora_weights.safetensors; pickled weights.
    """
    if ref.startswith(PREFIX):
        return _local(builtin_adapter_path(ref.removeprefix(PREFIX), field), ref, field)
    path = Path(ref).expanduser()
    # os.path.exists, unlike Path.exists, says False for a name too long for the file system
    if os.path.exists(path):  # noqa: PTH110
        return _local(path, ref, field)
    if not HUB_ID.match(ref) or ref.startswith((".", "/", "~")):
        raise InputError(
            f"{field}: no file or folder {ref!r}, and it is not a hub id like org/name"
        )
    import huggingface_hub

    try:
        snapshot = Path(
            huggingface_hub.snapshot_download(ref, allow_patterns=["*.safetensors", "*.bin"])
        )
    except Exception as e:  # the hub client raises many types; all mean "cannot resolve"
        raise InputError(
            f"{field}: cannot find {ref!r} on the Hugging Face hub or in its cache "
            f"({first_line(e)})"
        ) from None
    name = _weights_in(snapshot, ref, field)
    return AdapterSource(ref, ref, name, snapshot.name, f"hub:{ref}@{snapshot.name}/{name}")


def adapter_file(source: AdapterSource) -> Path:
    """The adapter's weights file on this machine (from the hub cache for a hub id)."""
    if source.revision is None:
        return Path(source.location) / source.weight_name
    import huggingface_hub

    return Path(
        huggingface_hub.hf_hub_download(
            source.location, source.weight_name, revision=source.revision
        )
    )


def _local(path: Path, ref: str, field: str) -> AdapterSource:
    if path.is_dir():
        name = _weights_in(path, ref, field)
        folder = path.resolve()
    else:
        if path.suffix != ".safetensors":
            raise InputError(
                f"{field}: {ref} is not a .safetensors file; pickled weights can run code when "
                "loaded: convert the adapter to safetensors"
            )
        name, folder = path.name, path.resolve().parent
    return AdapterSource(ref, str(folder), name, None, file_digest(folder / name))


def _weights_in(folder: Path, ref: str, field: str) -> str:
    """The adapter's file in a folder: the only .safetensors file, or the one diffusers names."""
    names = sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors")
    if WEIGHT_NAME in names or len(names) == 1:
        return WEIGHT_NAME if WEIGHT_NAME in names else names[0]
    if names:
        raise InputError(
            f"{field}: {ref} holds several .safetensors files ({', '.join(names[:3])}); "
            "name the adapter's file"
        )
    pickled = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    why = (
        f"only pickled weights ({pickled[0]}), which can run code when loaded; convert them"
        if pickled
        else "no .safetensors file"
    )
    raise InputError(f"{field}: {ref} holds {why}")


def check_fits(adapter: AdapterSource, model: ModelSource, field: str, shapes: dict) -> None:
    """Raise InputError unless every module the adapter changes exists in `model` with the
    features the adapter's factors take and give.

    Args:
        shapes: a cache, shared across calls: (model location, component) -> {module: weight
            shape}.
    """
    where = f"{field}: {adapter.ref} does not fit model {model.ref}"
    for key, (component, module, down, up) in _factors(adapter, field).items():
        modules = _module_shapes(model, component, where, shapes)
        # diffusers drops the prefix of text encoders saved before transformers flattened them
        weight = modules.get(module) or modules.get(module.removeprefix("text_model."))
        if weight is None:
            raise InputError(f"{where}: its {component} has no module {module} ({key})")
        if min(len(weight), len(down), len(up)) < 2:
            raise InputError(f"{where}: {component}.{module} is not a linear or convolution layer")
        if down[1] != weight[1] or up[0] != weight[0] or down[0] != up[1]:
            raise InputError(
                f"{where}: {component}.{module} maps {weight[1]} -> {weight[0]} features, the "
                f"adapter's factors {down[1]} -> {up[0]}"
            )


def _factors(
    adapter: AdapterSource, field: str
) -> dict[str, tuple[str, str, list[int], list[int]]]:
    """Each changed module, by one of its keys: (component, module, down shape, up shape)."""
    header = _header(adapter_file(adapter), adapter.ref, field)
    pairs: dict[tuple[str, str], dict[str, list[int]]] = {}
    for key, info in header.items():
        if key == "__metadata__" or key.endswith(IGNORED):
            continue
        ending = next((e for e in FACTORS if key.endswith(e)), None)
        component, _, module = key.removesuffix(ending or "").partition(".")
        if ending is None or not module:
            raise InputError(
                f"{field}: {adapter.ref} is not in diffusers' LoRA format (key {key!r}; expected "
                "COMPONENT.MODULE.lora_A.weight, as save_lora_weights writes)"
            )
        pairs.setdefault((component, module), {})[FACTORS[ending]] = info["shape"]
    factors = {}
    for (component, module), pair in pairs.items():
        key = f"{component}.{module}"
        if set(pair) != {"down", "up"}:
            raise InputError(f"{field}: {adapter.ref} has only one LoRA factor for {key}")
        factors[key] = (component, module, pair["down"], pair["up"])
    if not factors:
        raise InputError(f"{field}: {adapter.ref} holds no LoRA weights")
    return factors


def _header(path: Path, ref: str, field: str) -> dict[str, Any]:
    """A safetensors file's header: every tensor's dtype and shape, no tensor read."""
    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > MAX_HEADER_BYTES:
                raise ValueError(f"a header of {size:,} bytes")
            header = json.loads(f.read(size))
        if not isinstance(header, dict):
            raise ValueError("the header is not a mapping")
        for key, info in header.items():
            shape = info.get("shape") if isinstance(info, dict) else None
            if key != "__metadata__" and not isinstance(shape, list):
                raise ValueError(f"tensor {key!r} has no shape")
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise InputError(
            f"{field}: {ref} is not a readable safetensors file ({first_line(e)})"
        ) from None
    return header


def _module_shapes(
    model: ModelSource, component: str, where: str, shapes: dict
) -> dict[str, tuple[int, ...]]:
    """The weight shape of every module of one of the model's components, built from its config
    on the meta device (no weights read or allocated)."""
    key = (model.location, component)
    if key not in shapes:
        index = json.loads(model_file(model, "model_index.json").read_text(encoding="utf-8"))
        library, class_name = index.get(component) or (None, None)
        if component.startswith("_") or library not in LIBRARIES:
            names = [n for n, e in index.items() if isinstance(e, list) and e[0] in LIBRARIES]
            raise InputError(
                f"{where}: it changes {component!r}, which the model lacks (it has "
                f"{', '.join(names)})"
            )
        shapes[key] = _build_shapes(model, component, library, class_name)
    return shapes[key]


def _build_shapes(
    model: ModelSource, component: str, library: str, class_name: str
) -> dict[str, tuple[int, ...]]:
    import torch

    config_dir = model_file(model, f"{component}/config.json").parent
    with torch.device("meta"):
        if library == "diffusers":
            import diffusers

            cls = getattr(diffusers, class_name)
            module = cls.from_config(cls.load_config(config_dir))
        else:
            import transformers

            cls = getattr(transformers, class_name)
            module = cls(cls.config_class.from_pretrained(config_dir))
    return {
        name: tuple(m.weight.shape)
        for name, m in module.named_modules()
        if isinstance(getattr(m, "weight", None), torch.Tensor)
    }
