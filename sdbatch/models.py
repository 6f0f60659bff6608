"""Models: resolve a reference (a job's diffusers pipeline, a suite's CLIP) to something loadable
with an identity, and load a pipeline once.

`resolve_model` runs on the driver before any work starts: it checks the reference and records what
exactly will be used (a hash of local weights, or the hub commit). `load_pipeline` runs in each
worker, always through `from_pretrained`, never with remote code, and safetensors only unless the
spec opts out (`model_allow_pickle`). A pipeline whose model_index.json asks for code of its own,
or a local one with pickled weights, is refused by `resolve_model`, before Ray starts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdbatch.builtin import PREFIX, builtin_path
from sdbatch.digests import IDENTITY_SUFFIXES, folder_digest
from sdbatch.errors import InputError, first_line

TORCH_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Weights that torch.load unpickles: unlike safetensors, loading them can run code.
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
# Libraries a model_index.json may load components from, besides diffusers' own pipeline packages
# (a safety checker is ["stable_diffusion", "StableDiffusionSafetyChecker"]). Any other name asks
# for code: a module in the model's folder, or whatever module of that name is already imported.
LIBRARIES = ("diffusers", "transformers")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: where `from_pretrained` finds it and what exactly it is."""

    ref: str  # as the spec wrote it
    location: str  # a local folder, or a hub repo id
    revision: str | None  # the hub commit, pinned so every worker loads the same files
    identity: str  # "sha256:..." of a local folder's files, or "hub:REPO@COMMIT"
    allow_pickle: bool = False  # load pickled weights where a component has no safetensors


@dataclass(frozen=True)
class ModelKind:
    """What a reference must point to: the spec field it comes from and the file that proves it."""

    field: str
    marker: str
    description: str


PIPELINE = ModelKind("model", "model_index.json", "a diffusers pipeline")
CLIP = ModelKind("clip.model", "config.json", "a transformers CLIP model")


def resolve_model(
    ref: str,
    revision: str | None = None,
    kind: ModelKind = PIPELINE,
    allow_pickle: bool = False,
    task: str = "text2img",
) -> ModelSource:
    """Check a model reference and pin what it points to.

    Args:
        ref: ``builtin:NAME``, a local folder, or a Hugging Face hub id.
        revision: a hub branch, tag or commit (hub ids only).
        kind: a diffusers pipeline (the default) or a CLIP model.
        allow_pickle: a pipeline may have weights that are not safetensors (the spec's
            `model_allow_pickle`).
        task: the job's task; a pipeline for another task than text2img is checked by
            `check_task`, not here.

    Raises:
        InputError: no such builtin, folder or hub model, or one of another kind; a pipeline
            that asks for custom code; a local pipeline with pickled weights, unless allowed.
    """
    if ref.startswith(PREFIX):
        folder = builtin_path(ref.removeprefix(PREFIX), kind.field)
        return ModelSource(ref, str(folder), None, folder_digest(folder))
    folder = Path(ref).expanduser()
    # os.path.isdir, unlike Path.is_dir, says False for a name too long for the file system
    if os.path.isdir(folder):  # noqa: PTH112
        if not (folder / kind.marker).is_file():
            raise InputError(
                f"{kind.field}: {ref} is not {kind.description} folder (no {kind.marker})"
            )
        suffixes = IDENTITY_SUFFIXES
        if kind is PIPELINE:
            components = _components(folder / kind.marker, ref, task)
            if allow_pickle:
                # Pickles may then be what loads, so they are part of what the model is.
                suffixes += PICKLE_SUFFIXES
            else:
                _refuse_pickles(folder, components, ref)
        identity = folder_digest(folder, suffixes)
        return ModelSource(ref, str(folder.resolve()), None, identity, allow_pickle)
    if not HUB_ID.match(ref) or ref.startswith((".", "/", "~")):
        raise InputError(f"{kind.field}: no folder {ref!r}, and it is not a hub id like org/name")
    return _resolve_hub(ref, revision, kind, allow_pickle, task)


def _components(index: Path, ref: str, task: str) -> list[str]:
    """The component folders model_index.json names; refuses a pipeline that is not one of
    diffusers' own text-to-image pipelines, or that asks for code of its own.

    A custom pipeline class, or a component library other than diffusers and transformers, is
    code that comes with the model. sdbatch never passes trust_remote_code or custom_pipeline, so
    such a model would fail in every worker, after Ray started; it is refused here instead. So is
    an image-to-image, inpainting, unconditional or video pipeline for a text2img job: the class
    must be in the table diffusers' AutoPipelineForText2Image loads from (`check_task` checks
    the other tasks' classes).
    """
    try:
        entries = json.loads(index.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"model: cannot read {ref}'s model_index.json ({e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"model: {ref}: model_index.json is not valid JSON ({e})") from None
    if not isinstance(entries, dict):
        raise InputError(f"model: {ref}: model_index.json is not a JSON object")
    pipeline = entries.get("_class_name")
    if isinstance(pipeline, list):
        raise InputError(
            f"model: {ref} asks for a custom pipeline class {pipeline!r} in model_index.json; "
            "sdbatch loads diffusers' own pipelines only and never runs code shipped with a model"
        )
    if task == "text2img" and pipeline not in _text_to_image_classes():
        raise InputError(
            f"model: {ref} holds {f'a {pipeline}' if pipeline else 'no _class_name'} "
            "(model_index.json); sdbatch needs a text-to-image pipeline, like "
            "StableDiffusionPipeline"
        )
    components = []
    for name, entry in entries.items():
        if name.startswith("_") or not isinstance(entry, list) or not entry or entry[0] is None:
            continue  # a setting (requires_safety_checker) or an absent optional component
        library = entry[0]
        if library not in LIBRARIES and not _diffusers_pipeline_package(library):
            raise InputError(
                f"model: {ref} loads component {name!r} from {library!r} (model_index.json), "
                "not diffusers or transformers; sdbatch never runs code shipped with a model"
            )
        components.append(name)
    return components


def _diffusers_pipeline_package(name: Any) -> bool:
    """Whether `name` is a package of diffusers.pipelines, looked up on disk: importing
    diffusers.pipelines would pull torch into the driver just to check a name."""
    if not isinstance(name, str) or not name.isidentifier():
        return False
    package = importlib.util.find_spec("diffusers")
    return any(
        (Path(root) / "pipelines" / name / "__init__.py").is_file()
        for root in package.submodule_search_locations
    )


def _refuse_pickles(folder: Path, components: list[str], ref: str) -> None:
    """Refuse a pipeline with a component whose weights are pickles only: from_pretrained with
    use_safetensors=True would fail on it inside every worker, after Ray started."""
    pickled = []
    for name in components:
        suffixes = {p.suffix for p in (folder / name).rglob("*") if p.is_file()}
        if suffixes & set(PICKLE_SUFFIXES) and ".safetensors" not in suffixes:
            pickled.append(name)
    if pickled:
        raise InputError(
            f"model: {ref} has weights that are not safetensors ({', '.join(pickled)}), and "
            "unpickling can run code; convert them (save_pretrained(safe_serialization=True)) "
            "or set model_allow_pickle: true"
        )


def model_file(source: ModelSource, name: str) -> Path:
    """A small file of a resolved model (a config), from its folder or the hub cache."""
    if source.revision is None:
        return Path(source.location) / name
    import huggingface_hub

    return Path(huggingface_hub.hf_hub_download(source.location, name, revision=source.revision))


def _resolve_hub(
    repo_id: str, revision: str | None, kind: ModelKind, allow_pickle: bool, task: str
) -> ModelSource:
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
        _components(Path(snapshot) / kind.marker, repo_id, task)
    commit = Path(snapshot).name
    return ModelSource(repo_id, repo_id, commit, f"hub:{repo_id}@{commit}", allow_pickle)


def fetch_model(source: ModelSource, kind: ModelKind = PIPELINE) -> str:
    """Make a resolved model loadable on this machine with HF_HUB_OFFLINE=1: a hub model's files
    at its pinned commit fetched into the Hugging Face cache (those `from_pretrained` reads, no
    more), a folder checked; returns where the files are.

    Raises:
        InputError: the folder is not on this machine, or the hub files cannot be fetched.
    """
    if source.revision is None:
        if not os.path.isdir(source.location):  # noqa: PTH112 (see resolve_model)
            raise InputError(f"{kind.field}: no folder {source.location} on this machine")
        return source.location
    try:
        if kind is PIPELINE:
            import diffusers

            # What load_pipeline's from_pretrained downloads, chosen the same way.
            return str(
                diffusers.DiffusionPipeline.download(
                    source.location,
                    revision=source.revision,
                    use_safetensors=None if source.allow_pickle else True,
                )
            )
        import huggingface_hub

        # transformers models load configs, tokenizer and processor files, and safetensors.
        return huggingface_hub.snapshot_download(
            source.location,
            revision=source.revision,
            allow_patterns=["*.json", "*.txt", "*.safetensors"],
        )
    except Exception as e:  # the hub client raises many types; all mean "cannot fetch"
        raise InputError(
            f"{kind.field}: cannot fetch {source.ref}@{source.revision} ({first_line(e)})"
        ) from None


def fetch_models(models: list[tuple[ModelSource, ModelKind]]) -> dict[str, str]:
    """`fetch_model` for each (source, kind): where each model's files are, by its reference."""
    return {source.ref: fetch_model(source, kind) for source, kind in models}


def _text_to_image_classes() -> set[str]:
    """Class names of the pipelines diffusers' AutoPipelineForText2Image loads (its own table)."""
    return _auto_classes("TEXT2IMAGE")


def _auto_classes(table: str) -> set[str]:
    """Class names in one of diffusers' AutoPipeline tables: TEXT2IMAGE, IMAGE2IMAGE, INPAINT."""
    import transformers

    # The table imports every diffusers pipeline (seconds, so builtin models skip this check),
    # and transformers then warns about optional image backends none of them needs here.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        from diffusers.pipelines import auto_pipeline
    finally:
        transformers.logging.set_verbosity(verbosity)
    mapping = getattr(auto_pipeline, f"AUTO_{table}_PIPELINES_MAPPING")
    return {pipeline.__name__ for pipeline in mapping.values()}


DEPTH2IMG = "StableDiffusionDepth2ImgPipeline"


def check_task(source: ModelSource, task: str, depth_given: bool = False) -> None:
    """Refuse a model that cannot do `task`, judged by model_index.json's class and the UNet's
    input channels: img2img needs a 4-channel model of diffusers' text-to-image or image-to-image
    tables; inpaint and outpaint that, or an inpainting pipeline (9 channels: image, mask and
    masked image), as AutoPipelineForInpainting.from_pipe takes them; depth2img a
    StableDiffusionDepth2ImgPipeline (5 channels) with its depth estimator, unless every row
    gives a depth map (`depth_given`).

    Raises:
        InputError: the model cannot do the task.
    """
    if task == "text2img":
        return  # resolve_model checked the class
    index = json.loads(model_file(source, "model_index.json").read_text(encoding="utf-8"))
    pipeline = index.get("_class_name")
    try:
        unet = json.loads(model_file(source, "unet/config.json").read_text(encoding="utf-8"))
        channels = unet.get("in_channels")
    except (OSError, ValueError):
        channels = None
    holds = f"model {source.ref} holds a {pipeline} ({channels}-channel UNet)"
    if task == "depth2img":
        if pipeline != DEPTH2IMG or channels != 5:
            raise InputError(
                f"task: depth2img needs a {DEPTH2IMG} with a 5-channel UNet (the depth map is "
                f"its fifth input); {holds}"
            )
        estimator = all(index.get(n, [None])[0] for n in ("depth_estimator", "feature_extractor"))
        if not (estimator or depth_given):
            raise InputError(
                f"prompts.depth_column: model {source.ref} has no depth estimator; give every "
                "prompt a depth map"
            )
        return
    plain = _auto_classes("TEXT2IMAGE") | _auto_classes("IMAGE2IMAGE")
    if task == "img2img" and not (channels == 4 and pipeline in plain):
        raise InputError(
            "task: img2img needs a text-to-image or image-to-image pipeline with a 4-channel "
            f"UNet, like StableDiffusionPipeline; {holds}"
        )
    inpainting = _auto_classes("INPAINT")
    if task in ("inpaint", "outpaint") and not (
        (channels == 4 and pipeline in plain | inpainting)
        or (channels == 9 and pipeline in inpainting)
    ):
        raise InputError(
            f"task: {task} needs a 4-channel text-to-image pipeline (StableDiffusionPipeline) "
            f"or an inpainting one (StableDiffusionInpaintPipeline, 9 channels); {holds}"
        )


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


def load_pipeline(source: ModelSource, dtype: str, device: str) -> Any:
    """Load the pipeline once, on `device`, in `dtype` (fp16, bf16 or fp32)."""
    import diffusers
    import torch
    import transformers

    # Loading bars of every worker would interleave with the driver's own progress bar.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    # Text-to-image pipelines load as they always have; inpainting and depth-to-image ones (9- and
    # 5-channel UNets) as the class model_index.json names, which check_task has accepted.
    index = json.loads(model_file(source, "model_index.json").read_text(encoding="utf-8"))
    absent = {}
    if index.get("_class_name") in _text_to_image_classes():
        loader = diffusers.AutoPipelineForText2Image
    else:
        loader = diffusers.DiffusionPipeline
        # Components saved as [null, null] (a depth2img model without its depth estimator, run
        # on given depth maps) are passed as None: from_pretrained would refuse them missing.
        absent = {
            name: None
            for name, entry in index.items()
            if not name.startswith("_") and isinstance(entry, list) and entry[:1] == [None]
        }
    pipe = loader.from_pretrained(
        source.location,
        **absent,
        revision=source.revision,
        dtype=getattr(torch, TORCH_DTYPES[dtype]),
        # None: safetensors where a component has them, else its pickle, which diffusers reads
        # with torch.load(weights_only=True) (tensors and plain containers, no code).
        use_safetensors=None if source.allow_pickle else True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
