"""The job spec: the YAML a user writes to say what to generate, as one typed, validated value.

Every dataclass here checks its own fields when it is made, so a spec built in Python is held to
the same rules as one read from YAML, and every check runs before Ray or a model starts. A bad field
raises `InputError` with one line that names it (``sweep.num_inference_steps[1]``) and what is
allowed.

Example:
    >>> spec = load_spec("jobs/demo.yaml")
    >>> spec.sweep.scheduler
    ('euler', 'ddim')
    >>> Sweep(guidance_scale=[7.5, 750])
    Traceback (most recent call last):
    ...
    sdbatch.errors.InputError: guidance_scale[1]: must be between 0 and 100, got 750.0

Numbers are bounded by what a model can do, and counts by what a job can hold, so a typo (an
extra zero, 1e30) is refused here rather than found by every worker, or never.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sdbatch.schedulers import SCHEDULERS
from sdbatch.typed_data import (
    conform,
    file_name,
    from_data,
    known,
    read_yaml,
    relative_to,
    require,
    shown,
    unique,
    within,
)

MAX_SEED = 2**63 - 1
# diffusers' schedulers are trained on 1,000 timesteps (num_train_timesteps) and some (DDIM)
# refuse more inference steps than that.
MAX_STEPS = 1000
# Far past useful (SD is run at 1-20): a larger one only saturates every image.
MAX_GUIDANCE = 100
# Sides are multiples of 8, the VAE's downsampling; SD 1.5 is trained at 512 px and SDXL at
# 1,024 px, and 4,096 px is already 64 times the pixels of SD 1.5's images.
MAX_SIDE = 4096
# Counts far above any real job's and far below what would stall planning or fill memory.
MAX_CONFIGURATIONS = 10_000
MAX_IMAGES_PER_PROMPT = 10_000
MAX_ACTORS = 1024  # explicit actors; `auto` places one per GPU, however many
MAX_BATCH_SIZE = 1024
MAX_SHARD_SIZE = 10_000
MAX_RETRIES = 10


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
            within(
                steps,
                1,
                MAX_STEPS,
                f"num_inference_steps[{i}]",
                f"diffusers schedulers train on {MAX_STEPS:,} timesteps",
            )
        unique(self.guidance_scale, "guidance_scale")
        for i, g in enumerate(self.guidance_scale):
            within(g, 0, MAX_GUIDANCE, f"guidance_scale[{i}]")
        count = len(self.scheduler) * len(self.num_inference_steps) * len(self.guidance_scale)
        require(
            count <= MAX_CONFIGURATIONS,
            "scheduler x num_inference_steps x guidance_scale",
            f"{count:,} configurations; at most {MAX_CONFIGURATIONS:,}",
        )
        within(self.images_per_prompt, 1, MAX_IMAGES_PER_PROMPT, "images_per_prompt")
        for side in ("height", "width"):
            size = getattr(self, side)
            require(
                8 <= size <= MAX_SIDE and size % 8 == 0,
                side,
                f"must be a multiple of 8 (the VAE's downsampling) from 8 to {MAX_SIDE:,}, "
                f"got {shown(size)}",
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
        if self.actors != "auto":
            within(self.actors, 1, MAX_ACTORS, "actors", "or auto: one per GPU")
        within(self.batch_size, 1, MAX_BATCH_SIZE, "batch_size")
        within(self.shard_size, 1, MAX_SHARD_SIZE, "shard_size")
        within(self.png_compress_level, 0, 9, "png_compress_level")
        within(self.retries, 0, MAX_RETRIES, "retries")


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
        # out/NAME by default: a name with a / or .. would write outside out/
        file_name(self.name, "name")
        require(
            self.model.strip() != "", "model", "must name a hub id, a local folder or builtin:NAME"
        )
        within(self.seed, 0, MAX_SEED, "seed")


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
