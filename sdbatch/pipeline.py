"""Models: resolve a spec's `model` to something loadable with an identity, and load it once.

`resolve_model` runs on the driver before any work starts: it checks the reference and records what
exactly will be used (a hash of local weights, or the hub commit). `load_pipeline` runs in each
worker, always through `from_pretrained`, safetensors only and never with remote code.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdbatch.builtin import PREFIX, builtin_path
from sdbatch.errors import InputError, first_line

TORCH_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# What makes up a pipeline: weights, configs and tokenizer files. Other files (READMEs, images,
# duplicate .bin/.ckpt copies) do not change images and would only slow the hash down.
IDENTITY_SUFFIXES = (".safetensors", ".json", ".txt", ".model")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: where `from_pretrained` finds it and what exactly it is."""

    ref: str  # as the spec wrote it
    location: str  # a local folder, or a hub repo id
    revision: str | None  # the hub commit, pinned so every worker loads the same files
    identity: str  # "sha256:..." of a local folder's files, or "hub:REPO@COMMIT"


@dataclass(frozen=True)
class ModelKind:
    """What a reference must point to: the spec field it comes from and the file that proves it."""

    field: str
    marker: str
    description: str


PIPELINE = ModelKind("model", "model_index.json", "a diffusers pipeline")
CLIP = ModelKind("clip.model", "config.json", "a transformers CLIP model")


def resolve_model(ref: str, revision: str | None = None, kind: ModelKind = PIPELINE) -> ModelSource:
    """Check a model reference and pin what it points to.

    Args:
        ref: ``builtin:NAME``, a local folder, or a Hugging Face hub id.
        revision: a hub branch, tag or commit (hub ids only).
        kind: a diffusers pipeline (the default) or a CLIP model.

    Raises:
        InputError: no such builtin, folder or hub model, or one of another kind.
    """
    if ref.startswith(PREFIX):
        folder = builtin_path(ref.removeprefix(PREFIX), kind.field)
        return ModelSource(ref, str(folder), None, weights_digest(folder))
    folder = Path(ref).expanduser()
    if folder.is_dir():
        if not (folder / kind.marker).is_file():
            raise InputError(
                f"{kind.field}: {ref} is not {kind.description} folder (no {kind.marker})"
            )
        if kind is PIPELINE:
            _check_text_to_image(folder / kind.marker, ref)
        return ModelSource(ref, str(folder.resolve()), None, weights_digest(folder))
    if not HUB_ID.match(ref) or ref.startswith((".", "/", "~")):
        raise InputError(f"{kind.field}: no folder {ref!r}, and it is not a hub id like org/name")
    return _resolve_hub(ref, revision, kind)


def model_file(source: ModelSource, name: str) -> Path:
    """A small file of a resolved model (a config), from its folder or the hub cache."""
    if source.revision is None:
        return Path(source.location) / name
    import huggingface_hub

    return Path(huggingface_hub.hf_hub_download(source.location, name, revision=source.revision))


def _resolve_hub(repo_id: str, revision: str | None, kind: ModelKind) -> ModelSource:
    import huggingface_hub

    try:
        # Fetches (or, with HF_HUB_OFFLINE=1, finds in the cache) just the marker file: enough
        # to pin the commit and to know what kind of model the repo holds.
        snapshot = huggingface_hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=[kind.marker]
        )
    except Exception as e:  # the hub client raises many types; all mean "cannot resolve"
        raise InputError(
            f"{kind.field}: cannot find {repo_id!r} on the Hugging Face hub or in its cache "
            f"({first_line(e)})"
        ) from None
    if not (Path(snapshot) / kind.marker).is_file():
        raise InputError(f"{kind.field}: hub repo {repo_id!r} is not {kind.description}")
    if kind is PIPELINE:
        _check_text_to_image(Path(snapshot) / kind.marker, repo_id)
    commit = Path(snapshot).name
    return ModelSource(repo_id, repo_id, commit, f"hub:{repo_id}@{commit}")


def _check_text_to_image(index: Path, ref: str) -> None:
    """Refuse a pipeline that diffusers' AutoPipelineForText2Image would not load from its
    model_index.json class: an image-to-image, inpainting, unconditional or video pipeline."""
    try:
        config = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"model: {ref}: model_index.json is not valid JSON ({e})") from None
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name not in _text_to_image_classes():
        raise InputError(
            f"model: {ref} holds {f'a {name}' if name else 'no _class_name'} (model_index.json); "
            "sdbatch needs a text-to-image pipeline, like StableDiffusionPipeline"
        )


def _text_to_image_classes() -> set[str]:
    """Class names of the pipelines diffusers' AutoPipelineForText2Image loads (its own table)."""
    import transformers

    # The table imports every diffusers pipeline (seconds, so builtin models skip this check),
    # and transformers then warns about optional image backends none of them needs here.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        from diffusers.pipelines.auto_pipeline import AUTO_TEXT2IMAGE_PIPELINES_MAPPING
    finally:
        transformers.logging.set_verbosity(verbosity)
    return {pipeline.__name__ for pipeline in AUTO_TEXT2IMAGE_PIPELINES_MAPPING.values()}


def longer_than_context(source: ModelSource, texts: list[str]) -> set[str]:
    """The texts longer than the pipeline's tokenizers take (their model_max_length: 77 tokens
    for CLIP), which its text encoders silently cut. Loads the tokenizers only, not the model.

    Raises:
        InputError: a tokenizer cannot be loaded (a damaged file, an unknown class).
    """
    import transformers

    components = json.loads(model_file(source, "model_index.json").read_text(encoding="utf-8"))
    distinct = list(dict.fromkeys(texts))
    long = set()
    for name in ("tokenizer", "tokenizer_2"):  # SDXL has a second CLIP tokenizer
        library, class_name = components.get(name) or (None, None)
        if library != "transformers":
            continue  # absent, or saved as [null, null]
        # The class model_index.json names, loaded as diffusers loads it: AutoTokenizer would
        # first look for a model config.json, which a pipeline's tokenizer folder does not have
        # (fatal for a hub id with HF_HUB_OFFLINE=1).
        try:
            tokenizer = getattr(transformers, class_name).from_pretrained(
                source.location, subfolder=name, revision=source.revision
            )
        except (OSError, ValueError, AttributeError) as e:  # unreadable, damaged, unknown class
            raise InputError(
                f"model: cannot load {source.ref}'s {name} ({first_line(e)})"
            ) from None
        # verbose=False: transformers would warn once per long text that it exceeds the maximum.
        ids = tokenizer(distinct, verbose=False)["input_ids"]
        long.update(
            t for t, i in zip(distinct, ids, strict=True) if len(i) > tokenizer.model_max_length
        )
    return long


def weights_digest(folder: Path) -> str:
    """sha256 over a pipeline folder's weight, config and tokenizer files (names and bytes)."""
    h = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in IDENTITY_SUFFIXES)
    for path in files:
        h.update(path.relative_to(folder).as_posix().encode() + b"\x00")
        _hash_file(h, path)
    return f"sha256:{h.hexdigest()}"


def file_digest(path: Path) -> str:
    """sha256 of one file's bytes (a weights file)."""
    return f"sha256:{_hash_file(hashlib.sha256(), path).hexdigest()}"


def _hash_file(h: Any, path: Path) -> Any:
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h


def load_pipeline(source: ModelSource, dtype: str, device: str) -> Any:
    """Load the text-to-image pipeline once, on `device`, in `dtype` (fp16, bf16 or fp32)."""
    import diffusers
    import torch
    import transformers

    # Loading bars of every worker would interleave with the driver's own progress bar.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    pipe = diffusers.AutoPipelineForText2Image.from_pretrained(
        source.location,
        revision=source.revision,
        dtype=getattr(torch, TORCH_DTYPES[dtype]),
        use_safetensors=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
