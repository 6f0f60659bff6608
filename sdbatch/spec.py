"""Job specs and evaluation suites: the YAML a user writes, parsed once into typed values.

Every check here runs before Ray or a model starts. A bad field raises `InputError` with one line
that names the field (``sweep.num_inference_steps[1]``) and what is allowed.

Example:
    >>> spec = load_spec("jobs/demo.yaml")
    >>> spec.sweep.scheduler
    ('ddim', 'euler_a')
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from sdbatch.errors import InputError
from sdbatch.schedulers import SCHEDULERS

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class PromptSource:
    """Where the prompts are: a Parquet file or folder, and which columns mean what."""

    path: str
    column: str = "prompt"
    id_column: str | None = None
    negative_column: str | None = None
    limit: int | None = None
    # A null or blank prompt is usually a broken export: refused unless the user says to drop it.
    blank: Literal["error", "skip"] = "error"


@dataclass(frozen=True)
class Sweep:
    """The grid: every scheduler x steps x guidance combination is one configuration."""

    scheduler: tuple[str, ...] = ("euler",)
    num_inference_steps: tuple[int, ...] = (25,)
    guidance_scale: tuple[float, ...] = (7.5,)
    images_per_prompt: int = 1
    height: int = 512
    width: int = 512
    negative_prompt: str = ""


@dataclass(frozen=True)
class Runtime:
    """How the work is run. None of it changes which images are made, so a resume may change it."""

    actors: int | Literal["auto"] = "auto"
    batch_size: int = 8
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    # Prompts per work unit. A unit is the grain of resume: smaller loses less work on a crash,
    # larger writes fewer, bigger Parquet files.
    shard_size: int = 16
    # zlib level of the lossless PNGs: 1 is several times faster than 6-9 for a few % more bytes.
    png_compress_level: int = 1
    # Times a unit is retried (on any actor) after it raised or its actor died, before it is
    # bisected to the prompts at fault, which are recorded as failed while the job goes on.
    retries: int = 2


@dataclass(frozen=True)
class JobSpec:
    """A whole job: model, prompts, sweep, seed, output and runtime."""

    name: str
    model: str
    prompts: PromptSource
    sweep: Sweep = Sweep()
    seed: int = 0
    output: str | None = None
    model_revision: str | None = None
    # Pickled weights (.bin, .ckpt) can run code when loaded; only safetensors load unless this
    # is true, and then torch.load's weights_only=True unpickler reads them.
    model_allow_pickle: bool = False
    runtime: Runtime = Runtime()
    # The evaluation suite `sdbatch run` applies after generating (relative to the spec file).
    suite: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# attribute_accuracy: for prompts of the shapes world (sdbatch.world), whether each image shows
# the asked-for color, shape, size and position, judged from its pixels.
METRICS = ("clip_score", "fid", "kid", "attribute_accuracy")
FEATURES = ("inception", "clip")  # or "module:PACKAGE.MODULE:NAME", any nn.Module factory
DEFAULT_CACHE = "~/.cache/sdbatch/reference"


@dataclass(frozen=True)
class ClipSettings:
    """The CLIP model behind CLIP score and the `clip` feature extractor."""

    model: str = "openai/clip-vit-large-patch14"
    revision: str | None = None


@dataclass(frozen=True)
class FidSettings:
    """The feature extractor behind FID and KID, and how images are resized for it."""

    features: str = "inception"
    # inception: a local copy of torch-fidelity's weights file (else torch's hub cache is used).
    weights: str | None = None
    # inception: False resizes to 299 px exactly like the original TensorFlow FID (and
    # torch-fidelity); True uses antialiased bilinear resizing. Changes the number: it is recorded.
    antialias: bool = False


@dataclass(frozen=True)
class KidSettings:
    """KID's subset sampling (torchmetrics' KernelInceptionDistance)."""

    subsets: int = 100
    subset_size: int = 1000


@dataclass(frozen=True)
class ReferenceSource:
    """The real images FID compares against: images, or precomputed (mu, sigma) statistics."""

    images: str | None = None  # a Parquet file/folder with an `image` column, or an image folder
    stats: str | None = None  # a .npz with mu and sigma (pytorch-fid / clean-fid format)
    # Reference images are resized (short side, bicubic) and center-cropped to this many pixels
    # before feature extraction; null keeps them as stored.
    resolution: int | None = None
    limit: int | None = None


@dataclass(frozen=True)
class Bootstrap:
    """Bootstrap confidence intervals over images."""

    samples: int = 200
    confidence: float = 0.95
    seed: int = 0


@dataclass(frozen=True)
class EvalRuntime:
    """How feature extraction runs; never changes a number."""

    actors: int | Literal["auto"] = "auto"
    batch_size: int = 32
    retries: int = 2  # as in a job spec's runtime


@dataclass(frozen=True)
class Suite:
    """An evaluation suite: which metrics, computed with which models, against which reference."""

    name: str
    metrics: tuple[str, ...] = METRICS
    # Images the model's safety checker flagged (and blacked out): left out of every metric of
    # their configuration, or scored like the others.
    safety: Literal["exclude", "include"] = "exclude"
    clip: ClipSettings = ClipSettings()
    fid: FidSettings = FidSettings()
    kid: KidSettings = KidSettings()
    reference: ReferenceSource | None = None
    bootstrap: Bootstrap = Bootstrap()
    cache: str = DEFAULT_CACHE  # where computed reference statistics are kept
    runtime: EvalRuntime = EvalRuntime()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def needs_features(self) -> bool:
        return "fid" in self.metrics or "kid" in self.metrics


def load_spec(path: str | Path) -> JobSpec:
    """Read and validate a job spec file.

    Relative prompt paths are taken relative to the spec file; `output` defaults to ``out/NAME``
    and, like a local `model` folder, is relative to the working directory.

    Raises:
        InputError: the file is missing, is not YAML, or a field is wrong.
    """
    path = Path(path)
    data = _read_yaml(path, "spec", "jobs/demo.yaml")
    prompts = data.get("prompts")
    if isinstance(prompts, dict) and isinstance(prompts.get("path"), str):
        prompts["path"] = _relative_to(prompts["path"], path.parent)
    if isinstance(data.get("suite"), str):
        data["suite"] = _relative_to(data["suite"], path.parent)
    return parse_spec(data)


def load_suite(path: str | Path) -> Suite:
    """Read and validate an evaluation suite; its file paths are relative to the suite file.

    Raises:
        InputError: the file is missing, is not YAML, or a field is wrong.
    """
    path = Path(path)
    data = _read_yaml(path, "suite", "eval/demo.yaml")
    reference = data.get("reference")
    if isinstance(reference, dict):
        for key in ("images", "stats"):
            if isinstance(reference.get(key), str):
                reference[key] = _relative_to(reference[key], path.parent)
    fid = data.get("fid")
    if isinstance(fid, dict) and isinstance(fid.get("weights"), str):
        fid["weights"] = _relative_to(fid["weights"], path.parent)
    return parse_suite(data)


def parse_suite(data: dict[str, Any]) -> Suite:
    """Build a `Suite` from plain data (parsed YAML) and check every field."""
    suite = _build(Suite, data, "")
    _check_suite(suite)
    return suite


def _read_yaml(path: Path, what: str, example: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{what}: {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{what}: cannot read {path}: {e}") from None
    try:
        # safe_load builds plain values only: nothing in a spec is ever evaluated as code.
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where else ""
        raise InputError(f"{what}: {path} is not valid YAML{line}") from None
    if not isinstance(data, dict):
        raise InputError(f"{what}: {path} must be a mapping of fields, like {example}")
    data.setdefault("name", path.stem)
    return data


def parse_spec(data: dict[str, Any]) -> JobSpec:
    """Build a `JobSpec` from plain data (parsed YAML) and check every field."""
    spec = _build(JobSpec, data, "")
    _check(spec)
    return spec


def _relative_to(location: str, base: Path) -> str:
    if "://" in location or Path(location).expanduser().is_absolute():
        return location
    return str((base / location).resolve())


def _build(cls: type, data: Any, where: str) -> Any:
    """Construct dataclass `cls` from a mapping, converting each field by its type annotation."""
    if not isinstance(data, dict):
        raise InputError(f"{where.rstrip('.') or 'spec'}: must be a mapping of fields")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise InputError(f"{where}{unknown[0]}: unknown field; allowed here: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _convert(hints[name], data[name], f"{where}{name}")
        elif f.default is dataclasses.MISSING:
            raise InputError(f"{where}{name}: required field is missing")
    return cls(**values)


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where + ".")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, where)
            except InputError:
                pass
        raise InputError(f"{where}: must be {_describe(hint)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise InputError(f"{where}: must be {_describe(hint)}, got {value!r}")
        return value
    if origin is tuple:
        item = typing.get_args(hint)[0]
        items = value if isinstance(value, list) else [value]
        if not items:
            raise InputError(f"{where}: must list at least one value")
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(items))
    # bool is an int in Python; a YAML `yes` must not pass as a step count.
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[hint]
    if not ok:
        raise InputError(f"{where}: must be {_describe(hint)}, got {value!r}")
    return float(value) if hint is float else value


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    return {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        type(None): "null",
    }[hint]


def _check(spec: JobSpec) -> None:
    """Range and vocabulary checks that types alone do not express."""
    _require(spec.name.strip() != "", "name", "must not be empty")
    _require(
        spec.model.strip() != "", "model", "must name a hub id, a local folder or builtin:NAME"
    )
    _require(0 <= spec.seed <= MAX_SEED, "seed", f"must be between 0 and {MAX_SEED}")

    p = spec.prompts
    _require(p.path.strip() != "", "prompts.path", "must name a Parquet file or folder")
    _require(p.limit is None or p.limit >= 1, "prompts.limit", "must be >= 1 or null")

    s = spec.sweep
    _known(s.scheduler, SCHEDULERS, "sweep.scheduler", "scheduler")
    _unique(s.num_inference_steps, "sweep.num_inference_steps")
    for i, steps in enumerate(s.num_inference_steps):
        _require(steps >= 1, f"sweep.num_inference_steps[{i}]", f"must be >= 1, got {steps}")
    _unique(s.guidance_scale, "sweep.guidance_scale")
    for i, g in enumerate(s.guidance_scale):
        _require(
            math.isfinite(g) and g >= 0,
            f"sweep.guidance_scale[{i}]",
            f"must be a finite number >= 0, got {g}",
        )
    _require(s.images_per_prompt >= 1, "sweep.images_per_prompt", "must be >= 1")
    for side in ("height", "width"):
        size = getattr(s, side)
        _require(
            size >= 8 and size % 8 == 0,
            f"sweep.{side}",
            f"must be a positive multiple of 8 (the VAE's downsampling), got {size}",
        )

    r = spec.runtime
    _require(r.actors == "auto" or r.actors >= 1, "runtime.actors", "must be 'auto' or >= 1")
    _require(r.batch_size >= 1, "runtime.batch_size", "must be >= 1")
    _require(r.shard_size >= 1, "runtime.shard_size", "must be >= 1")
    _require(
        0 <= r.png_compress_level <= 9, "runtime.png_compress_level", "must be between 0 and 9"
    )
    _require(r.retries >= 0, "runtime.retries", "must be >= 0")


def _check_suite(suite: Suite) -> None:
    _require(suite.name.strip() != "", "name", "must not be empty")
    _known(suite.metrics, METRICS, "metrics", "metric")
    _require(suite.clip.model.strip() != "", "clip.model", "must name a hub id or a local folder")
    features = suite.fid.features
    _require(
        features in FEATURES or _is_module_path(features),
        "fid.features",
        f"must be {' or '.join(FEATURES)} or module:PACKAGE.MODULE:NAME, got {features!r}",
    )
    if suite.fid.weights is not None:
        _require(
            Path(suite.fid.weights).expanduser().is_file(),
            "fid.weights",
            f"no weights file at {suite.fid.weights}",
        )
    _require(suite.kid.subsets >= 1, "kid.subsets", "must be >= 1")
    _require(suite.kid.subset_size >= 2, "kid.subset_size", "must be >= 2")
    ref = suite.reference
    if suite.needs_features:
        needs = next(m for m in suite.metrics if m in ("fid", "kid"))
        _require(ref is not None, "reference", f"required by metric {needs}: images or stats")
    if ref is not None:
        _require(
            (ref.images is None) != (ref.stats is None),
            "reference",
            "give exactly one of images (real images) or stats (a .npz with mu and sigma)",
        )
        _require(
            ref.resolution is None or ref.resolution >= 8, "reference.resolution", "must be >= 8"
        )
        _require(ref.limit is None or ref.limit >= 2, "reference.limit", "must be >= 2 or null")
        if ref.stats is not None:
            _require(
                "://" in ref.stats or Path(ref.stats).is_file(),
                "reference.stats",
                f"no file at {ref.stats}",
            )
    b = suite.bootstrap
    _require(b.samples >= 0, "bootstrap.samples", "must be >= 0 (0 turns intervals off)")
    _require(0 < b.confidence < 1, "bootstrap.confidence", "must be between 0 and 1, e.g. 0.95")
    r = suite.runtime
    _require(r.actors == "auto" or r.actors >= 1, "runtime.actors", "must be 'auto' or >= 1")
    _require(r.batch_size >= 1, "runtime.batch_size", "must be >= 1")
    _require(r.retries >= 0, "runtime.retries", "must be >= 0")


def _is_module_path(features: str) -> bool:
    target = features.removeprefix("module:")
    return features.startswith("module:") and target.count(":") == 1 and all(target.split(":"))


def _require(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise InputError(f"{where}: {message}")


def _known(values: tuple[str, ...], known: Iterable[str], where: str, what: str) -> None:
    """Each value listed once and one of `known`."""
    _unique(values, where)
    for i, value in enumerate(values):
        _require(
            value in known,
            f"{where}[{i}]",
            f"unknown {what} {value!r}; known: {', '.join(known)}",
        )


def _unique(values: tuple, where: str) -> None:
    seen = set()
    for v in values:
        # Two equal values would make two identical configurations and duplicate every image.
        _require(v not in seen, where, f"{v!r} is listed twice")
        seen.add(v)
