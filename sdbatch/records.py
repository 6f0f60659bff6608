"""Typed records of what generation writes and reads back: run.json, each work unit's done marker,
and the units that failed. Their JSON form is defined here and nowhere else; fields added since
a file was first written have defaults, so older outputs still read."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from sdbatch.adapters import AdapterSource
from sdbatch.models import ModelSource
from sdbatch.spec import JobSpec
from sdbatch.sweep import Config
from sdbatch.typed_data import from_data

FORMAT = 1  # of run.json and the markers; a reader of a newer format would refuse it
VERSIONED = ("sdbatch", "torch", "diffusers", "transformers", "ray", "pyarrow")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries an image depends on (read without importing them)."""
    return {name: metadata.version(name) for name in VERSIONED}


@dataclass(frozen=True)
class PromptCounts:
    """The prompt set a run used: how many, their sha256, and how many were set aside."""

    count: int
    sha256: str
    skipped_blank: int = 0  # dropped under `prompts.blank: skip`
    truncated: int = 0  # longer than the text encoder reads


@dataclass(frozen=True)
class FailedUnit:
    """A unit (or the piece of one that bisection narrowed it to) that failed every attempt."""

    unit_id: str
    config_id: str
    prompt_ids: tuple[str, ...]
    images: int
    attempts: int
    error: str  # the last error, one line


@dataclass(frozen=True)
class HistoryEntry:
    """What one `generate` call did."""

    finished: str  # ISO 8601, UTC
    new_images: int
    seconds: float  # from the first loaded worker to the last commit
    workers: tuple[dict[str, Any], ...]  # where each actor ran (host, device, versions)
    nsfw_flagged: int = 0  # new images the model's safety checker flagged
    failed_units: tuple[FailedUnit, ...] = ()
    stalled_units: tuple[str, ...] = ()  # a unit's id per attempt given up on for no progress


@dataclass(frozen=True)
class RunRecord:
    """run.json: the resolved spec, what exactly ran it, and the history of the calls."""

    spec: JobSpec
    model: ModelSource  # the model the run started with: its configurations' ids leave it out
    prompts: PromptCounts
    configs: tuple[Config, ...]
    schedulers: dict[str, dict[str, Any]]  # name -> the diffusers class and config overrides
    versions: dict[str, str]
    dtype: str | None = None  # fp16, bf16 or fp32: known once the cluster's hardware is
    history: tuple[HistoryEntry, ...] = ()
    format: int = FORMAT
    # Every model and adapter of the sweep, resolved (empty in outputs made before they were
    # sweep axes: `model` was the only one).
    models: tuple[ModelSource, ...] = ()
    adapters: tuple[AdapterSource, ...] = ()

    @property
    def sources(self) -> dict[str, ModelSource]:
        """Every model of the run by its reference."""
        return {m.ref: m for m in self.models or (self.model,)}

    @property
    def identity(self) -> str:
        """What fixes every image's pixels besides its configuration (model, seed, sizes, images
        per prompt), hashed: unit file names and markers carry it, so that nothing made under
        another identity is ever taken for this run's work."""
        fixed = {
            "model": self.model.identity,
            "seed": self.spec.seed,
            "images_per_prompt": self.spec.sweep.images_per_prompt,
        }
        return hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()[:12]

    def to_json(self) -> bytes:
        data = dataclasses.asdict(self)
        # Each configuration is stored with its id, which readers look configurations up by, and
        # its cost in model evaluations per image.
        data["configs"] = [
            {
                "config_id": c.config_id,
                "unet_evals_per_image": c.unet_evals_per_image,
                **dataclasses.asdict(c),
            }
            for c in self.configs
        ]
        return json.dumps(data, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, body: bytes | str) -> RunRecord:
        """Raises: InputError or ValueError for a file that is not a run record."""
        data = json.loads(body)
        # The id and the cost follow from the configuration's fields: derived again on reading.
        derived = ("config_id", "unet_evals_per_image")
        # Configurations of outputs made before models were an axis name none: theirs.
        model = {"model": data["model"]["ref"]} if isinstance(data.get("model"), dict) else {}
        data["configs"] = [
            model | {k: v for k, v in config.items() if k not in derived}
            for config in data["configs"]
        ]
        return from_data(cls, data)


@dataclass(frozen=True)
class BatchTiming:
    """One pipeline call of a unit: its images, its wall time, and whether it was warm-up."""

    images: int
    seconds: float
    # The worker's first call at this input shape: it pays one-time costs (lazy initialization,
    # allocator growth, kernel selection), so it does not measure what an image costs.
    warmup: bool


@dataclass(frozen=True)
class UnitMarker:
    """A work unit's done marker, `_units/UNIT.json`: written last, it is the unit's commit."""

    unit_id: str
    config_id: str
    prompt_ids: tuple[str, ...]
    images: int
    generation_seconds: float  # summed over its images
    nsfw_flagged: int = 0  # images the model's safety checker flagged
    file: str = ""  # its Parquet file under the output (set when the unit commits)
    # What a rerun and eval check the file against (0 and "" in outputs of sdbatch 0.1).
    bytes: int = 0
    sha256: str = ""
    run: str = ""  # the identity of the run that made it (RunRecord.identity)
    # Each pipeline call in order, and the device they ran on (empty in outputs of sdbatch 0.1).
    batches: tuple[BatchTiming, ...] = ()
    device: str = ""
    # Unix time of the commit, by the committing worker's clock: `sdbatch status` measures
    # images/s from it (0 in outputs of sdbatch 0.1).
    committed: float = 0.0

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode()

    @classmethod
    def from_json(cls, body: bytes | str) -> UnitMarker:
        return from_data(cls, json.loads(body))
