"""Feature extractors: what FID and KID compare, chosen by a suite's `fid:` section.

`describe_extractor` runs on the driver: it checks the suite's extractor and pins what it is (name,
dimension, weights hash, resize mode) without loading large weights. `build_extractor` runs in each
feature worker. All take batches of uint8 RGB images:

    inception   torchmetrics' InceptionV3 (torch-fidelity's port of the TensorFlow FID network),
                2048-d pool features, resized to 299 px inside the network
    clip        the suite's CLIP image embeddings (CLIP's own preprocessing)
    dinov2      FD-DINOv2 (Stein et al. 2023): a transformers Dinov2Model (`fid.model`), the CLS
                token after its final layernorm; the whole image resized by the model's own
                image processor to its input size, without the center crop, as their dgm-eval
    module:P:N  any torch.nn.Module: P.N is a module class or a function returning one; it gets
                uint8 N x 3 x H x W tensors, returns N x d, like torchmetrics' custom extractors
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np

from sdbatch.digests import file_digest, state_dict_digest
from sdbatch.errors import InputError, JobFailed, first_line
from sdbatch.evaluation.clip import ClipEncoder
from sdbatch.models import ModelKind, ModelSource, model_file, resolve_model
from sdbatch.typed_data import conform, require

INCEPTION_DIM = 2048
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
# CLIP's bicubic short-side resize and center crop, in PIL
CLIP_RESIZE = "clip-processor-pil"
FEATURES = ("inception", "clip", "dinov2")  # or "module:PACKAGE.MODULE:NAME", any nn.Module
# Stein et al.'s encoder: DINOv2 ViT-L/14 (dgm-eval's default, `dinov2_vitl14`)
DINOV2_MODEL = "facebook/dinov2-large"
DINOV2 = ModelKind("fid.model", "config.json", "a transformers model")
PROCESSOR_CONFIG = "preprocessor_config.json"


@dataclass(frozen=True)
class FidSettings:
    """The feature extractor behind FID and KID, and how images are resized for it (`fid:`)."""

    features: str = "inception"
    # inception: a local copy of torch-fidelity's weights file (else torch's hub cache is used).
    weights: str | None = None
    # inception: False resizes to 299 px exactly like the original TensorFlow FID (and
    # torch-fidelity); True uses antialiased bilinear resizing. Changes the number: it is recorded.
    antialias: bool = False
    # dinov2: a Dinov2Model as builtin:NAME, a local folder or a hub id (None: DINOV2_MODEL),
    # and for a hub id the branch, tag or commit to pin.
    model: str | None = None
    revision: str | None = None

    def __post_init__(self) -> None:
        conform(self)
        require(
            self.features in FEATURES or _is_module_path(self.features),
            "features",
            f"must be {' or '.join(FEATURES)} or module:PACKAGE.MODULE:NAME, got {self.features!r}",
        )
        for name in ("model", "revision"):
            value = getattr(self, name)
            require(
                value is None or self.features == "dinov2",
                name,
                f"names the DINOv2 model of features: dinov2, not of {self.features}",
            )
            require(value is None or value.strip() != "", name, "must not be empty")


@dataclass(frozen=True)
class ExtractorInfo:
    """A feature extractor pinned down: everything its features depend on."""

    name: str  # inception, clip, or module:P:N
    dim: int
    weights: str  # "sha256:..." of the weights, or the CLIP model's identity
    resize: str
    weights_path: str | None = None  # inception: the local weights file actors load
    antialias: bool = False
    model: ModelSource | None = None  # dinov2: the pinned model actors load

    @property
    def distance(self) -> str:
        """What the Fréchet distance on these features is called in the literature."""
        return "FD-DINOv2" if self.name == "dinov2" else "FID"

    @property
    def key(self) -> str:
        """A short name for files that hold this extractor's features."""
        text = f"{self.name}|{self.weights}|{self.resize}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def describe_extractor(fid: FidSettings, clip: ModelSource | None) -> ExtractorInfo:
    """Check the suite's feature extractor and pin it; raises InputError before any work."""
    if fid.features == "clip":
        config = _read_json(model_file(clip, "config.json"))
        return ExtractorInfo("clip", int(config["projection_dim"]), clip.identity, CLIP_RESIZE)
    if fid.features == "inception":
        path = _inception_weights(fid.weights)
        resize = "bilinear-antialias-299" if fid.antialias else "bilinear-tf1-299"
        return ExtractorInfo(
            "inception", INCEPTION_DIM, file_digest(path), resize, str(path), fid.antialias
        )
    if fid.features == "dinov2":
        return _describe_dinov2(fid)
    module = _import_module_extractor(fid.features)
    return ExtractorInfo(fid.features, _module_dim(module), state_dict_digest(module), "none")


def build_extractor(
    info: ExtractorInfo, device: str, clip: ClipEncoder | None
) -> Callable[[list[np.ndarray], np.ndarray | None], np.ndarray]:
    """In a worker: the extractor as a function of a batch of images and, when CLIP embedded
    them already, their embeddings (the `clip` extractor reuses them)."""
    import torch

    if info.name == "clip":
        return lambda images, embedded: (
            embedded if embedded is not None else clip.embed_images(images)
        )
    if info.name == "dinov2":
        return _dinov2_extractor(info.model, device)
    if info.name == "inception":
        from torchmetrics.image.fid import NoTrainInceptionV3

        # torch-fidelity loads the file with weights_only=False; the driver checked that it
        # loads with weights_only=True, i.e. holds tensors and no code.
        module = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=[str(INCEPTION_DIM)],
            feature_extractor_weights_path=info.weights_path,
            antialias=info.antialias,
        )
    else:
        module = _import_module_extractor(info.name)
        if state_dict_digest(module) != info.weights:
            raise JobFailed(
                f"fid.features: {info.name} built different weights in this worker than on the "
                "driver; it must load fixed weights, not initialise them randomly"
            )
    module = module.to(device).eval()

    def extract(images: list[np.ndarray], embedded: np.ndarray | None) -> np.ndarray:
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(device)
        return module(batch).reshape(len(images), -1).double().cpu().numpy()

    return extract


def _describe_dinov2(fid: FidSettings) -> ExtractorInfo:
    """Pin the DINOv2 model from its small files: what it is, its width, its input size."""
    source = resolve_model(fid.model or DINOV2_MODEL, fid.revision, DINOV2)
    config = _model_json(source, DINOV2.marker)
    if config.get("model_type") != "dinov2":
        raise InputError(
            f"fid.model: {source.ref} holds a {config.get('model_type')!r} model (config.json), "
            "not a DINOv2 one (model_type 'dinov2', as facebook/dinov2-large)"
        )
    if source.revision is None and not any(Path(source.location).glob("*.safetensors")):
        # Dinov2Model.from_pretrained(use_safetensors=True) would fail in every worker.
        raise InputError(
            f"fid.model: {source.ref} has no .safetensors weights, and unpickling .bin weights "
            "can run code; convert them with save_pretrained(safe_serialization=True)"
        )
    from PIL import Image

    processor = _model_json(source, PROCESSOR_CONFIG)
    crop, resample = processor.get("crop_size"), processor.get("resample")
    sized = isinstance(crop, dict) and {"height", "width"} <= crop.keys()
    if not sized or resample not in range(len(Image.Resampling)):
        raise InputError(
            f"fid.model: {source.ref}'s {PROCESSOR_CONFIG} has no crop_size (height, width) "
            "and PIL resample filter, as DINOv2's image processor has"
        )
    mode = Image.Resampling(resample).name.lower()
    resize = f"pil-{mode}-{crop['height']}x{crop['width']}"
    dim = int(config["hidden_size"])
    return ExtractorInfo("dinov2", dim, source.identity, resize, model=source)


def _dinov2_extractor(
    source: ModelSource, device: str
) -> Callable[[list[np.ndarray], np.ndarray | None], np.ndarray]:
    import torch
    from transformers import AutoImageProcessor, Dinov2Model

    kwargs = {"revision": source.revision}
    model = Dinov2Model.from_pretrained(source.location, use_safetensors=True, **kwargs)
    model = model.to(device).eval()
    # The PIL backend on every machine, as for CLIP: a feature must not depend on which optional
    # package a worker has.
    processor = AutoImageProcessor.from_pretrained(source.location, backend="pil", **kwargs)
    # Stein et al.'s dgm-eval resizes the whole image to the network's input (224 px for the
    # hub models); the processor's default would first crop away its border (256 -> 224).
    size = {"height": processor.crop_size["height"], "width": processor.crop_size["width"]}

    def extract(images: list[np.ndarray], embedded: np.ndarray | None) -> np.ndarray:
        pixels = processor(images=images, size=size, do_center_crop=False, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(pixel_values=pixels["pixel_values"].to(device)).last_hidden_state
        # the CLS token after the final layernorm: dgm-eval's x_norm_clstoken
        return hidden[:, 0].double().cpu().numpy()

    return extract


def _model_json(source: ModelSource, name: str) -> dict[str, Any]:
    """One of a model's JSON files, or an InputError naming `fid.model`."""
    try:
        return _read_json(model_file(source, name))
    except Exception as e:  # a missing file, a hub miss offline, bad JSON: all "not a model"
        raise InputError(
            f"fid.model: cannot read {source.ref}'s {name} ({first_line(e)})"
        ) from None


def _inception_weights(weights: str | None) -> Path:
    if find_spec("torch_fidelity") is None:
        raise InputError(
            "fid.features: inception needs torch-fidelity (pip install 'sdbatch[inception]'); "
            "or use features: clip"
        )
    import torch

    path = (
        Path(weights).expanduser()
        if weights
        else Path(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)
    )
    if not path.is_file():
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(URL_INCEPTION_V3, str(path), progress=False)
        except Exception as e:  # offline, proxy, disk: all mean "no weights"
            raise InputError(
                f"fid.weights: no InceptionV3 weights at {path} and the download failed ({e}); "
                f"fetch {URL_INCEPTION_V3} and set fid.weights to the file"
            ) from None
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(
            f"fid.weights: {path} is not a plain state dict of tensors ({e})"
        ) from None
    return path


def _import_module_extractor(target: str) -> Any:
    import torch

    module_name, _, attr = target.removeprefix("module:").partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise InputError(f"fid.features: cannot import {module_name}:{attr} ({e})") from None
    require(
        callable(factory),
        "fid.features",
        f"{target} is a {type(factory).__name__}, not a module class or a function returning one",
    )
    # user code: whatever it raises is the suite's fault, said in one line
    try:
        module = factory()
    except Exception as e:
        raise InputError(
            f"fid.features: {target}() raised {type(e).__name__}: {first_line(e)}"
        ) from None
    if not isinstance(module, torch.nn.Module):
        raise InputError(f"fid.features: {target} gave a {type(module).__name__}, not an nn.Module")
    return module.eval()


def _module_dim(module: Any) -> int:
    import torch

    if hasattr(module, "num_features"):
        return int(module.num_features)
    # torchmetrics' convention for custom extractors: probe with one 299 px uint8 image.
    try:
        with torch.inference_mode():
            return int(module(torch.zeros(1, 3, 299, 299, dtype=torch.uint8)).shape[-1])
    except Exception as e:
        raise InputError(
            f"fid.features: {type(module).__name__} fails on one 3 x 299 x 299 uint8 image "
            f"({type(e).__name__}: {first_line(e)})"
        ) from None


def _is_module_path(features: str) -> bool:
    target = features.removeprefix("module:")
    return features.startswith("module:") and target.count(":") == 1 and all(target.split(":"))


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())
