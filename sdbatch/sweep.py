"""The sweep's configurations, each image's seed, and the work units that cover what is left to do.

A work unit is one configuration x one shard of prompts: a small plain value that any worker can
take. Seeds depend on (spec seed, prompt id, sample index) only, so the same prompt and sample start
from the same noise in every configuration, and no batch, shard or actor layout changes an image.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import pandas as pd

from sdbatch.schedulers import unet_evals_per_image
from sdbatch.sources import Source
from sdbatch.spec import Expansion, Sweep


@dataclass(frozen=True)
class Config:
    """One point of the sweep: everything that changes an image besides prompt and seed."""

    scheduler: str
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    negative_prompt: str
    model: str = ""  # as the spec names it ("" in run.json of outputs from before models)
    lora: str | None = None  # the adapter as the spec names it; None: the model as it is
    lora_scale: float | None = None  # None exactly when lora is
    # False for the run's first model: its configurations' ids are those they had before models
    # and adapters were sweep axes, so outputs made then keep theirs, and extend.
    model_in_id: bool = False
    task: str = "text2img"
    strength: float | None = None  # img2img, inpaint, depth2img
    outpaint: str | None = None  # outpaint: pixels added per side, "t0-r16-b0-l0"

    @property
    def config_id(self) -> str:
        """Readable and stable: ``ddim-s25-g7.5-3fa9c1``, with ``-lora0.5`` for an adapter's
        scale and ``-img2img-str0.6`` or ``-outpaint-t0-r16-b0-l0`` for a task's setting; the
        hash covers every field (the model where `model_in_id`, the adapter where one is set,
        the task and its setting but for text2img, whose ids are those from before tasks)."""
        fields = asdict(self)
        del fields["model_in_id"]
        if not self.model_in_id:
            del fields["model"]
        if self.lora is None:
            del fields["lora"], fields["lora_scale"]
        if self.task == "text2img":
            del fields["task"], fields["strength"], fields["outpaint"]
        digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()
        lora = "" if self.lora_scale is None else f"-lora{self.lora_scale:g}"
        steps = f"s{self.num_inference_steps}-g{self.guidance_scale:g}"
        task = "" if self.task == "text2img" else f"-{self.task}"
        if self.strength is not None:
            task += f"-str{self.strength:g}"
        if self.outpaint is not None:
            task += f"-{self.outpaint}"
        return f"{self.scheduler}-{steps}{lora}{task}-{digest[:6]}"

    @property
    def unet_evals_per_image(self) -> int:
        """Model evaluations (UNet calls, per image of a batch) that one image costs."""
        # diffusers runs int(steps x strength) of the schedule's steps from a source image.
        steps = self.num_inference_steps
        if self.strength is not None:
            steps = min(int(steps * self.strength), steps)
        return unet_evals_per_image(self.scheduler, steps, self.guidance_scale)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of its images: the source's, plus an outpainting's border."""
        if self.outpaint is None:
            return self.height, self.width
        border = Expansion.parse(self.outpaint)
        return self.height + border.top + border.bottom, self.width + border.left + border.right


@dataclass(frozen=True)
class WorkUnit:
    """One configuration over a shard of prompts; the worker makes every sample of each prompt."""

    unit_id: str
    config: Config
    prompt_ids: tuple[str, ...]
    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]
    images_per_prompt: int
    seed: int
    run: str = ""  # the run's identity (RunRecord.identity), part of the unit's file name
    # Each prompt's source image (mask, depth map), in prompt order; empty for text2img.
    sources: tuple[Source, ...] = ()

    @property
    def num_images(self) -> int:
        return len(self.prompt_ids) * self.images_per_prompt


def configurations(
    sweep: Sweep,
    models: tuple[str, ...] = ("",),
    first: str | None = None,
    task: str = "text2img",
) -> list[Config]:
    """The Cartesian product of models and the sweep's lists, in the order the spec lists them.

    Args:
        first: the run's first model (default: the first of `models`), whose configurations'
            ids leave the model out; on an extension, the model the run was started with.
        task: the job's task; its strengths or outpaint expansions are the innermost axis.
    """
    first = models[0] if first is None else first
    return [
        Config(
            s,
            n,
            g,
            sweep.height,
            sweep.width,
            sweep.negative_prompt,
            m,
            lora,
            scale,
            m != first,
            task,
            strength,
            outpaint,
        )
        for m, (lora, scale), s, n, g, (strength, outpaint) in itertools.product(
            models,
            sweep.lora_settings,
            sweep.scheduler,
            sweep.num_inference_steps,
            sweep.guidance_scale,
            sweep.task_settings(task),
        )
    ]


def image_seed(seed: int, prompt_id: str, sample_index: int) -> int:
    """The seed of one image's generator: a hash of spec seed, prompt id and sample index."""
    digest = hashlib.sha256(f"{seed}\x00{prompt_id}\x00{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def negative_prompts(column: Iterable[str | None], default: str) -> tuple[str, ...]:
    """Each row's negative prompt: its own, or `default` (the sweep's) where it has none."""
    # A missing one is None, or NaN once pandas has held it.
    return tuple(n if isinstance(n, str) else default for n in column)


def plan_units(
    prompts: pd.DataFrame,
    configs: list[Config],
    images_per_prompt: int,
    seed: int,
    shard_size: int,
    done: Iterable[tuple[str, str]] = (),
    run: str = "",
    sources: Mapping[str, Source] | None = None,
) -> list[WorkUnit]:
    """Work units for every (configuration, prompt) pair not in `done`; each carries its prompts'
    `sources` (by prompt id) where the task has them.

    Shards run in the outer loop and configurations in the inner one, so a job stopped early holds
    every configuration for its first prompts: enough for paired comparisons.
    """
    finished = set(done)
    todo = {
        c.config_id: [
            i for i, pid in enumerate(prompts["prompt_id"]) if (c.config_id, pid) not in finished
        ]
        for c in configs
    }
    longest = max((len(rows) for rows in todo.values()), default=0)
    units = []
    for start in range(0, longest, shard_size):
        for config in configs:
            rows = todo[config.config_id][start : start + shard_size]
            if rows:
                shard = prompts.iloc[rows]
                units.append(_unit(shard, config, images_per_prompt, seed, run, sources or {}))
    return units


def split_unit(unit: WorkUnit) -> list[WorkUnit]:
    """The unit's prompts in two halves, or nothing for a unit of one prompt: bisecting a unit
    that keeps failing finds the prompts at fault, and the others still get made."""
    half = (len(unit.prompt_ids) + 1) // 2
    if half == len(unit.prompt_ids):
        return []
    return [
        dataclasses.replace(
            unit,
            unit_id=_unit_id(unit.config, unit.prompt_ids[part], unit.run),
            prompt_ids=unit.prompt_ids[part],
            prompts=unit.prompts[part],
            negative_prompts=unit.negative_prompts[part],
            sources=unit.sources[part],
        )
        for part in (slice(None, half), slice(half, None))
    ]


def _unit_id(config: Config, prompt_ids: tuple[str, ...], run: str) -> str:
    # Named by content, so a rerun that plans the same unit writes the same file name, and a run
    # with another seed or model never writes a name an earlier run used.
    digest = hashlib.sha1("\x00".join((run, *prompt_ids)).encode()).hexdigest()[:10]
    return f"{config.config_id}-{digest}"


def _unit(
    shard: pd.DataFrame,
    config: Config,
    images_per_prompt: int,
    seed: int,
    run: str,
    sources: Mapping[str, Source],
) -> WorkUnit:
    ids = tuple(shard["prompt_id"])
    negatives = negative_prompts(shard["negative_prompt"], config.negative_prompt)
    return WorkUnit(
        unit_id=_unit_id(config, ids, run),
        config=config,
        prompt_ids=ids,
        prompts=tuple(shard["prompt"]),
        negative_prompts=negatives,
        images_per_prompt=images_per_prompt,
        seed=seed,
        run=run,
        sources=tuple(sources[pid] for pid in ids) if sources else (),
    )
