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

import re
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
# A LoRA's scale multiplies its update; past +-10 its images are noise, so a larger one is a typo.
# Negative scales are allowed: they push away from what the adapter teaches.
MAX_LORA_SCALE = 10
MAX_MODELS = 100
# The tasks that take a strength; below, the tasks that start from a source image (all but
# text2img), and the fields each task may use: one given for a task that ignores it is refused,
# not silently dropped.
STRENGTH_TASKS = ("img2img", "inpaint", "depth2img")
# diffusers' own defaults for `strength` (its img2img and depth2img pipelines: 0.8; inpainting:
# 1.0, the masked area repainted from noise), used where sweep.strength is not given.
DEFAULT_STRENGTH = {"img2img": 0.8, "inpaint": 1.0, "depth2img": 0.8}
IMAGE_TASKS = ("img2img", "inpaint", "outpaint", "depth2img")
TASK_FIELDS = {
    "prompts.image_column": IMAGE_TASKS,
    "prompts.mask_column": ("inpaint",),
    "prompts.depth_column": ("depth2img",),
    "prompts.source_prompt_column": IMAGE_TASKS,
    "sweep.strength": STRENGTH_TASKS,
    "sweep.outpaint": ("outpaint",),
}
# The task fields that the tasks using them cannot do without.
REQUIRED = ("prompts.image_column", "prompts.mask_column", "sweep.outpaint")


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter in the sweep, and the scales it is applied at."""

    # A hub id, a local folder or .safetensors file, or builtin:NAME
    path: str
    scale: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        conform(self)
        require(
            self.path.strip() != "",
            "path",
            "must name a hub id, a local folder or .safetensors file, or builtin:NAME",
        )
        require(len(self.scale) > 0, "scale", "must list at least one number")
        unique(self.scale, "scale")
        for i, scale in enumerate(self.scale):
            within(scale, -MAX_LORA_SCALE, MAX_LORA_SCALE, f"scale[{i}]")


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
    # Image-conditioned tasks: each row's source image (an image struct {bytes, path}, sdbatch's
    # own output format, or a path/URI relative to the prompt file), its mask (inpaint: white =
    # repaint), its depth map (depth2img; else the model's depth estimator runs) and a caption of
    # the source (for directional metrics).
    image_column: str | None = None
    mask_column: str | None = None
    depth_column: str | None = None
    source_prompt_column: str | None = None

    def __post_init__(self) -> None:
        conform(self)
        require(self.path.strip() != "", "path", "must name a Parquet file or folder")
        require(self.limit is None or self.limit >= 1, "limit", "must be >= 1 or null")


EXPANSION_LABEL = re.compile(r"t(\d+)-r(\d+)-b(\d+)-l(\d+)")


@dataclass(frozen=True)
class Expansion:
    """Pixels an outpainting adds on each side of the source image."""

    top: int = 0
    right: int = 0
    bottom: int = 0
    left: int = 0

    def __post_init__(self) -> None:
        conform(self)
        for side in ("top", "right", "bottom", "left"):
            size = getattr(self, side)
            require(
                0 <= size <= MAX_SIDE and size % 8 == 0,
                side,
                f"must be a multiple of 8 (the VAE's downsampling) from 0 to {MAX_SIDE:,}, "
                f"got {shown(size)}",
            )
        require(
            self.top + self.right + self.bottom + self.left > 0,
            "top",
            "adds no pixels; at least one of top, right, bottom, left must be > 0",
        )

    @property
    def label(self) -> str:
        """Canonical form, as configurations and rows carry it: ``t0-r16-b0-l0``."""
        return f"t{self.top}-r{self.right}-b{self.bottom}-l{self.left}"

    @classmethod
    def parse(cls, label: str) -> Expansion:
        """The expansion a label ``t0-r16-b0-l0`` names."""
        match = EXPANSION_LABEL.fullmatch(label)
        if match is None:
            raise ValueError(f"outpaint {label!r}: not of the form t0-r16-b0-l0")
        return cls(*map(int, match.groups()))


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
    # LoRA adapters: each item null (the model as it is) or an adapter at one or more scales.
    lora: tuple[Adapter | None, ...] = (None,)
    # img2img, inpaint, depth2img: how much of the source is noised away (empty: diffusers'
    # default for the task, DEFAULT_STRENGTH). outpaint: the expansions, each a configuration.
    strength: tuple[float, ...] = ()
    outpaint: tuple[Expansion, ...] = ()

    def __post_init__(self) -> None:
        conform(self)
        require(len(self.lora) > 0, "lora", "must list null or adapters {path, scale}")
        unique(tuple(a.path if a else None for a in self.lora), "lora")
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
        for i, strength in enumerate(self.strength):
            require(
                0 < strength <= 1,
                f"strength[{i}]",
                f"must be in (0, 1] (the share of the denoising run), got {shown(strength)}",
            )
        if self.strength:
            unique(self.strength, "strength")
        if self.outpaint:
            unique(tuple(e.label for e in self.outpaint), "outpaint")
        for i, expansion in enumerate(self.outpaint):
            for side in ("height", "width"):
                extra = expansion.top + expansion.bottom if side == "height" else 0
                extra += expansion.left + expansion.right if side == "width" else 0
                require(
                    getattr(self, side) + extra <= MAX_SIDE,
                    f"outpaint[{i}]",
                    f"makes the {side} {getattr(self, side) + extra:,}; at most {MAX_SIDE:,}",
                )
        axes = "scheduler x num_inference_steps x guidance_scale"
        _check_count(self.configurations, axes if self.lora == (None,) else f"lora x {axes}")
        within(self.images_per_prompt, 1, MAX_IMAGES_PER_PROMPT, "images_per_prompt")
        for side in ("height", "width"):
            size = getattr(self, side)
            require(
                8 <= size <= MAX_SIDE and size % 8 == 0,
                side,
                f"must be a multiple of 8 (the VAE's downsampling) from 8 to {MAX_SIDE:,}, "
                f"got {shown(size)}",
            )

    @property
    def lora_settings(self) -> list[tuple[str | None, float | None]]:
        """(adapter, scale) for each adapter setting, in spec order; (None, None): no adapter."""
        return [
            (None, None) if a is None else (a.path, s)
            for a in self.lora
            for s in (a.scale if a else (None,))
        ]

    def task_settings(self, task: str) -> list[tuple[float | None, str | None]]:
        """(strength, outpaint label) for each setting of `task`'s own axis, in spec order;
        text2img has one, (None, None)."""
        if task == "outpaint":
            return [(None, e.label) for e in self.outpaint]
        if task in STRENGTH_TASKS:
            return [(s, None) for s in self.strength or (DEFAULT_STRENGTH[task],)]
        return [(None, None)]

    @property
    def configurations(self) -> int:
        """How many configurations the sweep holds for one model (and one task)."""
        steps, guidance = self.num_inference_steps, self.guidance_scale
        tasks = max(len(self.strength), len(self.outpaint), 1)
        return len(self.lora_settings) * len(self.scheduler) * len(steps) * len(guidance) * tasks


def _check_count(count: int, where: str) -> None:
    require(
        count <= MAX_CONFIGURATIONS,
        where,
        f"{count:,} configurations; at most {MAX_CONFIGURATIONS:,}",
    )


@dataclass(frozen=True)
class Runtime:
    """How the work is run. None of it changes which images are made, so a resume may change it."""

    actors: int | Literal["auto"] = "auto"
    # Images per pipeline call; auto: each worker measures 1, 2, 4, ... on its first unit and
    # keeps the fastest (probe batches are thrown away; see Worker.choose_batch_size).
    batch_size: int | Literal["auto"] = 8
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    # torch.compile of the UNet and the VAE decoder (true: mode "default"). Off by default: it
    # compiles for minutes per batch shape before the first image; a short job never wins it back.
    compile: bool | Literal["default", "reduce-overhead", "max-autotune"] = False
    # UNet and VAE in channels-last memory format; auto: on CUDA (faster convolutions), not on CPU.
    channels_last: bool | Literal["auto"] = "auto"
    # sdpa: torch's scaled_dot_product_attention (diffusers' AttnProcessor2_0, its default);
    # eager: diffusers' plain AttnProcessor (matmul, softmax, matmul), for debugging.
    attention: Literal["sdpa", "eager"] = "sdpa"
    # The VAE decodes in overlapping tiles; auto: for sides above 1,024 px (speed.py), where a whole
    # decode would need more memory than the UNet. Tiles are blended, so pixels change slightly.
    vae_tiling: bool | Literal["auto"] = "auto"
    # The VAE decodes a batch one image at a time (lower peak memory, same pixels); auto: on CUDA.
    vae_slicing: bool | Literal["auto"] = "auto"
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
        if self.batch_size != "auto":
            within(
                self.batch_size, 1, MAX_BATCH_SIZE, "batch_size", "or auto: the fastest measured"
            )
        within(self.shard_size, 1, MAX_SHARD_SIZE, "shard_size")
        within(self.png_compress_level, 0, 9, "png_compress_level")
        within(self.retries, 0, MAX_RETRIES, "retries")


@dataclass(frozen=True)
class Baseline:
    """What the report compares every model and adapter against; unset fields: the first model,
    no adapter."""

    model: str | None = None
    lora: str | None = None
    lora_scale: float | None = None


@dataclass(frozen=True)
class JobSpec:
    """A whole job: model(s), prompts, sweep, seed, output and runtime."""

    name: str
    # One model, or a list: each is a value of the sweep's model axis.
    model: str | tuple[str, ...]
    prompts: PromptSource
    task: Literal["text2img", "img2img", "inpaint", "outpaint", "depth2img"] = "text2img"
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
    baseline: Baseline = Baseline()

    def __post_init__(self) -> None:
        conform(self)
        # out/NAME by default: a name with a / or .. would write outside out/
        file_name(self.name, "name")
        many = not isinstance(self.model, str)
        unique(self.models, "model")
        for i, ref in enumerate(self.models):
            require(
                ref.strip() != "",
                f"model[{i}]" if many else "model",
                "must name a hub id, a local folder or builtin:NAME",
            )
        require(len(self.models) <= MAX_MODELS, "model", f"at most {MAX_MODELS} models")
        require(
            self.model_revision is None or len(self.models) == 1,
            "model_revision",
            "pins one hub model; with a list of models, give each as a local folder or builtin",
        )
        _check_count(len(self.models) * self.sweep.configurations, "model x sweep")
        within(self.seed, 0, MAX_SEED, "seed")
        self._check_task()
        self._check_baseline()

    @property
    def models(self) -> tuple[str, ...]:
        """The model references, in spec order."""
        return (self.model,) if isinstance(self.model, str) else self.model

    @property
    def baseline_setting(self) -> tuple[str, str | None, float | None]:
        """(model, adapter, scale) of the baseline, its defaults filled in: the first model, and
        no adapter (where the sweep has none, its first adapter setting)."""
        b = self.baseline
        model = b.model or self.models[0]
        if b.lora is not None or (None, None) in self.sweep.lora_settings:
            return (model, b.lora, b.lora_scale)
        return (model, *self.sweep.lora_settings[0])

    def _check_task(self) -> None:
        """Each task's fields given where it uses them, and only there."""
        task = self.task
        for field, tasks in TASK_FIELDS.items():
            section, name = field.split(".")
            given = getattr(getattr(self, section), name) not in (None, ())
            users = " and ".join([", ".join(tasks[:-1]), tasks[-1]] if len(tasks) > 1 else tasks)
            require(
                task in tasks or not given,
                field,
                f"used by {users} only; this job's task is {task}",
            )
            needed = field in REQUIRED and task in tasks
            require(given or not needed, field, f"task {task} needs it")
        # diffusers runs int(steps x strength) of the steps, and refuses to run none.
        strengths = [s for s, _ in self.sweep.task_settings(task) if s is not None]
        for strength in strengths:
            for steps in self.sweep.num_inference_steps:
                require(
                    int(steps * strength) >= 1,
                    "sweep.strength",
                    f"{strength:g} x {steps} num_inference_steps leaves no denoising step "
                    "(diffusers runs int(steps x strength) of them); raise either",
                )

    def _check_baseline(self) -> None:
        model, lora, scale = self.baseline_setting
        require(
            model in self.models,
            "baseline.model",
            f"{shown(model)} is not one of the spec's models ({', '.join(self.models)})",
        )
        require(
            (lora is None) == (scale is None),
            "baseline.lora_scale",
            "must be set with baseline.lora, and only with it",
        )
        require(
            (lora, scale) in self.sweep.lora_settings,
            "baseline.lora",
            f"{lora} at scale {shown(scale)} is not one of sweep.lora's settings",
        )


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
