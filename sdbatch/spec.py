"""The job spec: the YAML a user writes to say what to generate, as one typed, validated value.

Every dataclass here checks its own fields when it is made, so a spec built in Python is held to
the same rules as one read from YAML, and every check runs before Ray or a model starts. A bad field
raises `InputError` with one line that names it (``sweep.num_inference_steps[1]``) and what is
allowed.

Example:
    >>> spec = load_spec("jobs/demo.yaml")
    >>> spec.sweep.scheduler
    ('euler', 'ddim')
    >>> Sweep(num_inference_steps=[20, 0])
    Traceback (most recent call last):
    ...
    sdbatch.errors.InputError: num_inference_steps[1]: must be >= 1, got 0
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sdbatch.schedulers import SCHEDULERS
from sdbatch.typed_data import conform, from_data, known, read_yaml, relative_to, require, unique

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

    def __post_init__(self) -> None:
        conform(self)
        require(self.path.strip() != "", "path", "must name a Parquet file or folder")
        require(self.limit is None or self.limit >= 1, "limit", "must be >= 1 or null")


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

    def __post_init__(self) -> None:
        conform(self)
        known(self.scheduler, SCHEDULERS, "scheduler", "scheduler")
        unique(self.num_inference_steps, "num_inference_steps")
        for i, steps in enumerate(self.num_inference_steps):
            require(steps >= 1, f"num_inference_steps[{i}]", f"must be >= 1, got {steps}")
        unique(self.guidance_scale, "guidance_scale")
        for i, g in enumerate(self.guidance_scale):
            require(
                math.isfinite(g) and g >= 0,
                f"guidance_scale[{i}]",
                f"must be a finite number >= 0, got {g}",
            )
        require(self.images_per_prompt >= 1, "images_per_prompt", "must be >= 1")
        for side in ("height", "width"):
            size = getattr(self, side)
            require(
                size >= 8 and size % 8 == 0,
                side,
                f"must be a positive multiple of 8 (the VAE's downsampling), got {size}",
            )


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

    def __post_init__(self) -> None:
        conform(self)
        require(self.actors == "auto" or self.actors >= 1, "actors", "must be 'auto' or >= 1")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(self.shard_size >= 1, "shard_size", "must be >= 1")
        require(0 <= self.png_compress_level <= 9, "png_compress_level", "must be between 0 and 9")
        require(self.retries >= 0, "retries", "must be >= 0")


@dataclass(frozen=True)
class JobSpec:
    """A whole job: model, prompts, sweep, seed, output and runtime."""

    name: str
    model: str
    prompts: PromptSource
    sweep: Sweep = Sweep()
    seed: int = 0
    # Where to write; None: out/NAME, relative to the working directory.
    output: str | None = None
    model_revision: str | None = None
    # Pickled weights (.bin, .ckpt) can run code when loaded; only safetensors load unless this
    # is true, and then torch.load's weights_only=True unpickler reads them.
    model_allow_pickle: bool = False
    runtime: Runtime = Runtime()
    # The evaluation suite `sdbatch run` applies after generating (relative to the spec file).
    suite: str | None = None

    def __post_init__(self) -> None:
        conform(self)
        require(self.name.strip() != "", "name", "must not be empty")
        require(
            self.model.strip() != "", "model", "must name a hub id, a local folder or builtin:NAME"
        )
        require(0 <= self.seed <= MAX_SEED, "seed", f"must be between 0 and {MAX_SEED}")


def load_spec(path: str | Path) -> JobSpec:
    """Read and validate a job spec file.

    Relative prompt and suite paths are taken relative to the spec file; `output` defaults to
    ``out/NAME`` and, like a local `model` folder, is relative to the working directory.

    Raises:
        InputError: the file is missing, is not YAML, or a field is wrong.
    """
    path = Path(path)
    data = read_yaml(path, "spec", "jobs/demo.yaml")
    prompts = data.get("prompts")
    if isinstance(prompts, dict) and isinstance(prompts.get("path"), str):
        prompts["path"] = relative_to(prompts["path"], path.parent)
    if isinstance(data.get("suite"), str):
        data["suite"] = relative_to(data["suite"], path.parent)
    return parse_spec(data)


def parse_spec(data: dict[str, Any]) -> JobSpec:
    """Build a `JobSpec` from plain data (parsed YAML) and check every field."""
    return from_data(JobSpec, data)
