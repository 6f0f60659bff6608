"""Features: images in, CLIP embeddings and FID feature vectors out, shard by shard.

`describe_extractor` runs on the driver: it checks the suite's feature extractor and pins what it
is (name, dimension, weights hash, resize mode) without loading large weights. `FeatureWorker`
runs in each Ray actor: it loads CLIP and the extractor once, then turns a `FeatureUnit` (one
generated work unit's Parquet file, or a slice of the reference images) into a shard file of
per-image features and CLIP scores, and returns the shard's sufficient statistics per config.

Extractors (all take batches of uint8 RGB images):
    inception   torchmetrics' InceptionV3 (torch-fidelity's port of the TensorFlow FID network),
                2048-d pool features, resized to 299 px inside the network
    clip        the suite's CLIP image embeddings (CLIP's own preprocessing)
    module:P:N  any torch.nn.Module: P.N is a module class or a function returning one; it gets
                uint8 N x 3 x H x W tensors, returns N x d, like torchmetrics' custom extractors
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from sdbatch import world
from sdbatch.dataset import publish_beside
from sdbatch.errors import InputError, JobFailed
from sdbatch.metrics import FeatureStats, clip_scores
from sdbatch.pipeline import ModelSource, file_digest, model_file
from sdbatch.spec import FidSettings

INCEPTION_DIM = 2048
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
CLIP_RESIZE = "clip-processor-pil"
ATTRIBUTES = (
    "color",
    "shape",
    "size",
    "position",
)  # CLIP's bicubic short-side resize and center crop, in PIL


@dataclass(frozen=True)
class ExtractorInfo:
    """A feature extractor pinned down: everything its features depend on."""

    name: str  # inception, clip, or module:P:N
    dim: int
    weights: str  # "sha256:..." of the weights, or the CLIP model's identity
    resize: str
    weights_path: str | None = None  # inception: the local weights file actors load
    antialias: bool = False

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
    module = _import_module_extractor(fid.features)
    return ExtractorInfo(fid.features, _module_dim(module), _module_digest(module), "none")


@dataclass(frozen=True)
class FeatureUnit:
    """One shard of evaluation work: a generated unit's file, or a slice of reference images."""

    unit_id: str
    files: tuple[str, ...]  # one Parquet file, or image files
    destination: str  # the shard file (.npz) this unit writes
    num_images: int
    row_groups: tuple[int, ...] | None = None  # a slice of a Parquet reference file
    generated: bool = True  # generated images carry prompts: CLIP score them
    resolution: int | None = None  # reference images: resize and center-crop to this


@dataclass(frozen=True)
class FeatureSettings:
    """What every feature actor loads; plain values, so Ray ships them as they are."""

    clip: ModelSource | None  # None when no metric needs CLIP
    extractor: ExtractorInfo | None  # None when no metric needs features
    batch_size: int = 32
    attributes: bool = False  # judge shapes-world prompts' attributes from the pixels
    threads: int | None = None


class FeatureWorker:
    """Loads CLIP and the extractor once; each `run` turns one unit into one shard file."""

    def __init__(self, settings: FeatureSettings):
        import torch
        import transformers

        if settings.threads:
            torch.set_num_threads(settings.threads)
        # Loading bars of every worker would interleave with the driver's own progress bar.
        transformers.utils.logging.disable_progress_bar()
        self.settings = settings
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.clip = ClipEncoder(settings.clip, self.device) if settings.clip else None
        self.extract = None
        if settings.extractor is not None:
            self.extract = _build_extractor(settings.extractor, self.device, self.clip)

    def describe(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "device": self.device}

    def run(self, unit: FeatureUnit) -> Iterator[int | dict[str, Any]]:
        """Extract `unit`, yielding each batch's image count, then its statistics per config."""
        import torch

        # 1. read and decode the images (and, for generated ones, what made them)
        images, keys = read_images(unit)
        # 2. embed and extract, batch by batch
        embeddings, features = [], []
        size = self.settings.batch_size
        with torch.inference_mode():
            for start in range(0, len(images), size):
                batch = images[start : start + size]
                embedded = None
                if self.clip is not None and unit.generated:
                    embedded = self.clip.embed_images(batch)
                    embeddings.append(embedded)
                if self.extract is not None:
                    features.append(self.extract(batch, embedded))
                yield len(batch)
        # 3. score against the prompts, then write the shard and hand back its statistics
        shard: dict[str, np.ndarray] = {}
        if features:
            shard["features"] = np.concatenate(features).astype(np.float32)
        if embeddings:
            texts, truncated = self.clip.embed_texts(list(keys["prompt"]))
            shard["clip_score"] = clip_scores(np.concatenate(embeddings), texts)
            shard["clip_truncated"] = truncated
        if unit.generated:
            for name in ("prompt_id", "sample_index", "config_id"):
                shard[name] = np.asarray(keys[name])
            if self.settings.attributes:
                shard.update(judge_attributes(images, keys["prompt"]))
        write_npz(unit.destination, shard)
        yield {"unit_id": unit.unit_id, "stats": shard_stats(shard)}


def judge_attributes(images: list[np.ndarray], prompts: list[str]) -> dict[str, np.ndarray]:
    """Per image, 1.0 or 0.0 per attribute the pixels show as asked; NaN for other prompts."""
    columns = {f"{a}_correct": [] for a in ATTRIBUTES}
    for image, prompt in zip(images, prompts, strict=True):
        scene = world.Scene.parse(prompt)
        verdict = world.judge(image, scene) if scene else None
        for a in ATTRIBUTES:
            columns[f"{a}_correct"].append(float(getattr(verdict, a)) if verdict else np.nan)
    return {name: np.asarray(values) for name, values in columns.items()}


def shard_stats(shard: dict[str, np.ndarray]) -> dict[str, FeatureStats]:
    """A shard's feature statistics per config (one entry, "", for reference shards)."""
    if "features" not in shard:
        return {}
    features = shard["features"]
    if "config_id" not in shard:
        return {"": FeatureStats.of(features)}
    configs = shard["config_id"]
    return {str(c): FeatureStats.of(features[configs == c]) for c in np.unique(configs)}


def write_npz(destination: str, arrays: dict[str, Any]) -> None:
    """Publish `arrays` as an .npz at any fsspec location: written under a temporary name first."""

    def write(fs: Any, tmp: str) -> None:
        with fs.open(tmp, "wb") as f:
            np.savez(f, **arrays)

    publish_beside(destination, write)


def read_npz(location: str) -> dict[str, np.ndarray]:
    """Every array of an .npz (no pickles) at any fsspec location."""
    with fsspec.open(location, "rb") as f:
        return dict(np.load(io.BytesIO(f.read()), allow_pickle=False))


def read_images(unit: FeatureUnit) -> tuple[list[np.ndarray], dict[str, list[Any]]]:
    """Decode a unit's images to H x W x 3 uint8 arrays, with their key columns if generated."""
    keys: dict[str, list[Any]] = {}
    if len(unit.files) == 1 and unit.files[0].endswith(".parquet"):
        columns = ["image"]
        if unit.generated:
            columns += ["prompt_id", "sample_index", "config_id", "prompt"]
        with fsspec.open(unit.files[0], "rb") as f:
            parquet = pq.ParquetFile(f)
            groups = unit.row_groups or range(parquet.num_row_groups)
            table = parquet.read_row_groups(list(groups), columns=columns)
        blobs = [cell["bytes"] for cell in table.column("image").to_pylist()]
        keys = {name: table.column(name).to_pylist() for name in columns[1:]}
    else:
        blobs = [fsspec.open(path, "rb").open().read() for path in unit.files]
    # A reference `limit` can end inside a row group.
    images = [_decode(blob, unit.resolution) for blob in blobs[: unit.num_images]]
    return images, keys


def _decode(blob: bytes, resolution: int | None) -> np.ndarray:
    image = Image.open(io.BytesIO(blob)).convert("RGB")
    if resolution is not None:
        # Short side to `resolution` (bicubic, antialiased when shrinking), then a center crop.
        scale = resolution / min(image.size)
        size = (
            max(resolution, round(image.width * scale)),
            max(resolution, round(image.height * scale)),
        )
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    return np.asarray(image)


class ClipEncoder:
    """A CLIP model and its processors, loaded once through `from_pretrained` (safetensors only).

    Prompts longer than CLIP's context are truncated to it, keeping the end-of-text token whose
    embedding CLIP pools (slicing the token ids instead would drop it); each is counted.
    """

    def __init__(self, source: ModelSource, device: str):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        kwargs = {"revision": source.revision}
        self.model = CLIPModel.from_pretrained(source.location, use_safetensors=True, **kwargs)
        self.model = self.model.to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
        # The PIL backend on every machine: torchvision's resize differs slightly, and a score
        # must not depend on which optional package a worker has.
        self.image_processor = AutoImageProcessor.from_pretrained(
            source.location, backend="pil", **kwargs
        )
        self.context = self.model.config.text_config.max_position_embeddings
        self.device = device
        self._texts: dict[str, tuple[np.ndarray, bool]] = {}

    def embed_images(self, images: list[np.ndarray]) -> np.ndarray:
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return _tensor(self.model.get_image_features(pixel_values=pixels.to(self.device)))

    def embed_texts(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Text embeddings, and which texts were truncated (each distinct text encoded once)."""
        new = list(dict.fromkeys(t for t in texts if t not in self._texts))
        if new:
            lengths = [len(ids) for ids in self.tokenizer(new, verbose=False)["input_ids"]]
            tokens = self.tokenizer(
                new, padding=True, truncation=True, max_length=self.context, return_tensors="pt"
            ).to(self.device)
            embedded = _tensor(self.model.get_text_features(**tokens))
            for text, row, length in zip(new, embedded, lengths, strict=True):
                self._texts[text] = (row, length > self.context)
        rows = [self._texts[t] for t in texts]
        return np.stack([r[0] for r in rows]), np.array([r[1] for r in rows])


def _tensor(output: Any) -> np.ndarray:
    # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding.
    embedded = output if hasattr(output, "float") else output.pooler_output
    return embedded.detach().float().cpu().numpy()


def _build_extractor(
    info: ExtractorInfo, device: str, clip: ClipEncoder | None
) -> Callable[[list[np.ndarray], np.ndarray | None], np.ndarray]:
    import torch

    if info.name == "clip":
        return lambda images, embedded: (
            embedded if embedded is not None else clip.embed_images(images)
        )
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
        if _module_digest(module) != info.weights:
            raise JobFailed(
                f"fid.features: {info.name} built different weights in this worker than on the "
                "driver; it must load fixed weights, not initialise them randomly"
            )
    module = module.to(device).eval()

    def extract(images: list[np.ndarray], embedded: np.ndarray | None) -> np.ndarray:
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(device)
        return module(batch).reshape(len(images), -1).double().cpu().numpy()

    return extract


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
    module = factory()
    if not isinstance(module, torch.nn.Module):
        raise InputError(f"fid.features: {target} gave a {type(module).__name__}, not an nn.Module")
    return module.eval()


def _module_dim(module: Any) -> int:
    import torch

    if hasattr(module, "num_features"):
        return int(module.num_features)
    # torchmetrics' convention for custom extractors: probe with one 299 px uint8 image.
    with torch.inference_mode():
        return int(module(torch.zeros(1, 3, 299, 299, dtype=torch.uint8)).shape[-1])


def _module_digest(module: Any) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode() + b"\x00" + tensor.detach().cpu().contiguous().numpy().tobytes())
    return f"sha256:{h.hexdigest()}"


def _read_json(path: Path) -> dict[str, Any]:
    import json

    return json.loads(path.read_text())
