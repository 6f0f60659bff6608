"""`sdbatch generate`: spec in, committed image dataset out; resumable and safe to rerun.

Example (a dry run checks everything and plans the work without starting Ray):
    >>> import sdbatch
    >>> spec = sdbatch.load_spec("jobs/demo.yaml")
    >>> plan = sdbatch.generate(spec, output="out/doctest-demo", dry_run=True)
    >>> plan.total_images, plan.new_images
    (2304, 0)
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import pandas as pd

from sdbatch import distribute, schedulers
from sdbatch.adapters import AdapterSource, check_fits, resolve_adapter
from sdbatch.errors import InputError, first_line
from sdbatch.integrity import summarize, unit_problems
from sdbatch.lease import check_holder, held
from sdbatch.models import ModelSource, check_task, longer_than_context, resolve_model
from sdbatch.output import Output
from sdbatch.prompts import PromptSet, load_prompts, prompt_set_digest
from sdbatch.records import (
    FailedUnit,
    HistoryEntry,
    PromptCounts,
    RunRecord,
    library_versions,
)
from sdbatch.sources import Source, changed_sources, load_sources, sources_table
from sdbatch.spec import JobSpec
from sdbatch.sweep import (
    Config,
    WorkUnit,
    configurations,
    negative_prompts,
    plan_units,
    split_unit,
)
from sdbatch.worker import ACTOR_ENV, GenerationSetup, Worker

log = logging.getLogger("sdbatch")
# Larger jobs need `confirmed` (--yes): a slip in images_per_prompt or a sweep list must not
# start days of GPU time unasked. jobs/sd15_parti.yaml (117,504 images) is one that needs it.
MAX_UNCONFIRMED_IMAGES = 100_000
# How a refusal of the output goes on: --out overrides the spec's `output` and its default.
ELSEWHERE = "choose another output with --out"
# Fields of run.json that fix what every image looks like: a rerun must match them exactly.
FIXED_FIELDS = (
    ("model", "identity"),
    ("spec", "task"),
    ("spec", "seed"),
    ("spec", "sweep", "images_per_prompt"),
    ("spec", "sweep", "height"),
    ("spec", "sweep", "width"),
    ("spec", "sweep", "negative_prompt"),
)


@dataclass(frozen=True)
class GenerateSummary:
    """What a generate call did."""

    output: str
    total_images: int
    new_images: int
    seconds: float  # the whole call, Ray start and model loading included
    generation_seconds: float = 0.0  # from the first loaded worker to the last commit
    flagged: int = 0  # new images the model's safety checker flagged (black, as it made them)
    # Units that failed every attempt; a rerun retries exactly these.
    failed: tuple[FailedUnit, ...] = ()

    @property
    def failed_images(self) -> int:
        return sum(f.images for f in self.failed)


def generate(
    spec: JobSpec,
    *,
    output: str | None = None,
    address: str | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    confirmed: bool = False,
    force: bool = False,
    verify: bool = False,
) -> GenerateSummary:
    """Generate every image of `spec` that `output` does not hold yet.

    Args:
        output: where to write (default: the spec's `output`, else out/NAME).
        address: a Ray cluster address; None joins $RAY_ADDRESS or starts a local instance.
        overwrite: delete what sdbatch wrote at `output` and start over.
        dry_run: check everything and log the plan, but generate nothing.
        confirmed: allow a job of more than `MAX_UNCONFIRMED_IMAGES` images (--yes).
        force: take the output over from the driver holding it (see `sdbatch.lease`).
        verify: check every committed file's sha256, not only its size, before planning.

    Raises:
        InputError: bad spec, prompts, model or output, or the output is held by another driver;
            raised before any model loads.
        JobFailed: generation broke, the output store refused a write (StoreFailed), or another
            driver took the output over (LeaseLost); finished units are kept and a rerun resumes.
    """
    began = time.perf_counter()
    # 1. check every input before anything expensive starts
    prompt_set = load_prompts(spec.prompts)
    prompts = prompt_set.frame
    count = len(spec.models) * spec.sweep.configurations
    total = len(prompts) * count * spec.sweep.images_per_prompt
    if total > MAX_UNCONFIRMED_IMAGES and not (confirmed or dry_run):
        raise InputError(
            f"--yes: this job would generate {total:,} images ({len(prompts):,} prompts x "
            f"{count} configurations x {spec.sweep.images_per_prompt} images), more than "
            f"{MAX_UNCONFIRMED_IMAGES:,}; pass --yes to confirm"
        )
    if spec.runtime.dtype == "fp16" and distribute.local_without_gpu(address):
        raise InputError(
            "runtime.dtype: fp16 needs GPUs and this machine has none; use fp32 or bf16"
        )
    models = [
        resolve_model(
            ref, spec.model_revision, allow_pickle=spec.model_allow_pickle, task=spec.task
        )
        for ref in spec.models
    ]
    sources = _load_sources(spec, prompt_set, models)
    adapters = _resolve_adapters(spec, models)
    out = Output(output or spec.output or f"out/{spec.name}")
    field = _output_field(output, spec)
    _check_output(out, spec, field)
    spec = dataclasses.replace(spec, output=out.location)
    # An extension keeps the model the run started with first: its configurations' ids.
    started = None if overwrite else out.read_run()
    first = started.model.ref if started and started.model.ref in spec.models else spec.models[0]
    configs = configurations(spec.sweep, spec.models, first, spec.task)
    truncated = _count_truncated(prompts, spec, models)
    record = _run_record(spec, prompt_set, configs, models, adapters, first, truncated)
    log.info(
        "job %s: %d prompts x %d configurations x %d images = %d images -> %s",
        spec.name, len(prompts), len(configs), spec.sweep.images_per_prompt, total, out.location,
    )  # fmt: skip
    if dry_run:
        _plan(out, record, prompts, sources, overwrite, verify, field, dry_run=True)
        return GenerateSummary(out.location, total, 0, time.perf_counter() - began)

    with held(out.fs, out.root, force) as holder:
        previous, units = _plan(
            out, record, prompts, sources, overwrite, verify, field, dry_run=False
        )
        if not units:
            return GenerateSummary(out.location, total, 0, time.perf_counter() - began)
        left = sum(u.num_images for u in units)
        with distribute.session(address):
            # 4. plan the actors; the dtype follows the hardware
            plan = distribute.plan_actors(spec.runtime.actors)
            dtype = distribute.resolve_dtype(spec.runtime.dtype, plan)
            if previous is not None and previous.dtype != dtype:
                raise InputError(
                    f"runtime.dtype: {out.uri} was generated in {previous.dtype}, this run would "
                    f"use {dtype}; set runtime.dtype: {previous.dtype} or {ELSEWHERE}"
                )
            for model in models:
                log.info("model %s (%s)", model.ref, model.identity[:19])
            for adapter in adapters:
                log.info("adapter %s (%s)", adapter.ref, adapter.identity[:19])
            log.info("%s, %s", plan.describe(), dtype)

            # 5. record the run, then generate
            record = dataclasses.replace(
                record, dtype=dtype, history=previous.history if previous else ()
            )
            out.write_prompts(prompts)
            if sources:
                out.write_sources(sources_table(sources))
            out.write_run(record)
            setup = GenerationSetup(
                models=tuple(models),
                adapters=adapters,
                dtype=dtype,
                output=out.location,
                run_id=holder.run_id,
                batch_size=spec.runtime.batch_size,
                png_compress_level=spec.runtime.png_compress_level,
                log_dir=out.log_folder(),
                runtime=spec.runtime,
            )
            progress = (total, total - left, "generating")
            result = distribute.run_units(
                Worker,
                setup,
                units,
                plan,
                progress,
                spec.runtime.retries,
                split_unit,
                affinity=_model_of,
                env=ACTOR_ENV,
            )

        # 6. record what this call did, failures included: the run's stats live in run.json
        failed = tuple(
            FailedUnit(
                unit_id=f.unit.unit_id,
                config_id=f.unit.config.config_id,
                prompt_ids=f.unit.prompt_ids,
                images=f.unit.num_images,
                attempts=f.attempts,
                error=f.error,
            )
            for f in result.failed.values()
        )
        new = left - sum(f.images for f in failed)
        flagged = sum(marker.nsfw_flagged for marker in result.results.values())
        entry = HistoryEntry(
            finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            new_images=new,
            seconds=round(result.seconds, 3),
            workers=tuple(result.workers),
            nsfw_flagged=flagged,
            failed_units=failed,
            stalled_units=tuple(result.stalled),
        )
        check_holder(out.fs, out.root, holder.run_id)
        out.write_run(dataclasses.replace(record, history=(*record.history, entry)))
    log.info(
        "done: %d new images in %.1f s (%.2f images/s); %d of %d images in %s/images",
        new, result.seconds, new / max(result.seconds, 1e-9), total - left + new, total,
        out.location,
    )  # fmt: skip
    if flagged:
        log.warning(
            "%d of the %d new images were flagged by the model's safety checker, which made them "
            "black; column nsfw_flagged marks them, and eval leaves them out unless the suite "
            "says safety: include", flagged, new,
        )  # fmt: skip
    seconds = time.perf_counter() - began
    return GenerateSummary(out.location, total, new, seconds, result.seconds, flagged, failed)


def _model_of(unit: WorkUnit) -> str:
    """What a unit needs loaded: the model of its configuration."""
    return unit.config.model


def _load_sources(
    spec: JobSpec, prompts: PromptSet, models: list[ModelSource]
) -> dict[str, Source]:
    """Each prompt's source image (mask, depth map), checked and at the sweep's size, once every
    model is known to do the task; empty for text2img."""
    if spec.task == "text2img":
        return {}
    for model in models:
        check_task(model, spec.task, depth_given=spec.prompts.depth_column is not None)
    return load_sources(spec.prompts, prompts.sources, spec.sweep.height, spec.sweep.width)


def _resolve_adapters(spec: JobSpec, models: list[ModelSource]) -> tuple[AdapterSource, ...]:
    """Every adapter of the sweep, resolved and checked against every model it runs with."""
    adapters = []
    shapes: dict = {}  # each model component's module shapes, built once
    for i, item in enumerate(spec.sweep.lora):
        if item is None:
            continue
        field = f"sweep.lora[{i}].path"
        adapter = resolve_adapter(item.path, field)
        for model in models:
            check_fits(adapter, model, field, shapes)
        adapters.append(adapter)
    return tuple(adapters)


def _output_field(output: str | None, spec: JobSpec) -> str:
    """What chose the output, for its errors: --out, else the spec's `output`, else the
    default."""
    if output:
        return "--out"
    return "output" if spec.output else "output (by default out/NAME)"


def _check_output(out: Output, spec: JobSpec, field: str) -> None:
    """Raise InputError unless every worker can share the output, it holds nothing sdbatch did
    not write (its own leftovers are fine) and it takes one unit's worth of bytes."""
    out.check_shared()
    if out.read_run() is None and (foreign := out.foreign_entries()):
        raise InputError(
            f"{field}: {out.uri} holds files sdbatch did not write ({', '.join(foreign[:3])}) "
            f"and no sdbatch run.json; {ELSEWHERE}, empty or new"
        )
    unit_bytes = _unit_bytes(spec)
    try:
        out.check_writable(unit_bytes)
    except OSError as e:
        size = f"{unit_bytes / 1e3:.0f} kB" if unit_bytes < 1e6 else f"{unit_bytes / 1e6:.0f} MB"
        raise InputError(
            f"{field}: cannot write one unit's worth ({size}) to {out.uri} ({first_line(e)})"
        ) from None


def _plan(
    out: Output,
    record: RunRecord,
    prompts: pd.DataFrame,
    sources: dict[str, Source],
    overwrite: bool,
    verify: bool,
    field: str,
    dry_run: bool,
) -> tuple[RunRecord | None, list[WorkUnit]]:
    """Steps 2 and 3: the run the output holds (None: a new one) and the units left to do.

    Unless it is a dry run, units that do not match their markers are undone and files of
    unfinished units removed, so that the plan and the output agree.
    """
    spec = record.spec
    # 2. reconcile with what the output already holds
    previous = None if overwrite else out.read_run()
    if previous is not None:
        where = f"{field}: {out.uri}"
        _check_same_job(previous, record, out.read_prompts(), prompts, where)
        written = out.read_sources()
        if written is not None and (changed := changed_sources(written, sources)):
            raise InputError(
                f"{where} holds a different job ({len(changed)} source image(s), mask(s) or "
                f"depth map(s) changed, first {changed[0]!r}); use --overwrite to start over, "
                f"or {ELSEWHERE}"
            )
    if overwrite and not dry_run:
        out.clear()

    # 3. plan the work units that are not done yet; units that fail their check are redone
    markers = [] if overwrite else out.done_units()
    if problems := unit_problems(out, markers, record.identity, full=verify):
        log.warning(
            "%s %d unit(s) whose files do not match their markers: %s",
            "would redo" if dry_run else "redoing", len(problems), summarize(problems),
        )  # fmt: skip
        bad = {p.marker.unit_id for p in problems}
        if not dry_run:
            out.forget([p.marker for p in problems])
        markers = [m for m in markers if m.unit_id not in bad]
    done = {(m.config_id, pid) for m in markers for pid in m.prompt_ids}
    units = plan_units(
        prompts,
        list(record.configs),
        spec.sweep.images_per_prompt,
        spec.seed,
        spec.runtime.shard_size,
        done,
        record.identity,
        sources,
    )
    left = sum(u.num_images for u in units)
    total = len(prompts) * len(record.configs) * spec.sweep.images_per_prompt
    if markers:
        log.info("resuming: %d images done, %d left in %d units", total - left, left, len(units))
    if dry_run:
        for config in record.configs:
            todo = sum(u.num_images for u in units if u.config == config)
            log.info("  %s: %d images left", config.config_id, todo)
        log.info("dry run: %d images left in %d units; nothing generated", left, len(units))
    elif not units:
        log.info("nothing to generate")
    elif not overwrite and (orphans := out.remove_orphans(markers)):
        log.info("removed %d image files of units that never finished", orphans)
    return previous, units


def _unit_bytes(spec: JobSpec) -> int:
    """About what one unit's Parquet file takes (PNGs of SD images run near 1.5 bytes a pixel),
    up to 64 MB: what the start-up probe writes."""
    sweep = spec.sweep
    pixels = sweep.height * sweep.width * sweep.images_per_prompt * spec.runtime.shard_size
    return min(int(pixels * 1.5), 64 << 20)


def _count_truncated(prompts: pd.DataFrame, spec: JobSpec, models: list[ModelSource]) -> int:
    """How many prompts a model's text encoder will cut short (the prompt or its negative prompt
    is too long); warns once, since diffusers would only say so inside each worker."""
    negatives = negative_prompts(prompts["negative_prompt"], spec.sweep.negative_prompt)
    texts = [*prompts["prompt"], *negatives]
    long = set().union(*(longer_than_context(model, texts) for model in models))
    cut = prompts["prompt"].isin(long) | pd.Series(negatives, index=prompts.index).isin(long)
    ids = prompts.loc[cut, "prompt_id"].tolist()
    if ids:
        log.warning(
            "%d prompt(s) or their negative prompts are longer than the model's tokenizer takes "
            "and will be truncated, first %r",
            len(ids), ids[0],
        )  # fmt: skip
    return len(ids)


def _run_record(
    spec: JobSpec,
    prompts: PromptSet,
    configs: list[Config],
    models: list[ModelSource],
    adapters: tuple[AdapterSource, ...],
    first: str,
    truncated: int,
) -> RunRecord:
    return RunRecord(
        spec=spec,
        model=next(m for m in models if m.ref == first),
        models=tuple(models),
        adapters=adapters,
        prompts=PromptCounts(
            count=len(prompts.frame),
            sha256=prompt_set_digest(prompts.frame),
            skipped_blank=prompts.skipped_blank,
            truncated=truncated,
        ),
        configs=tuple(configs),
        schedulers=schedulers.describe(list(spec.sweep.scheduler)),
        versions=library_versions(),
    )


def _check_same_job(
    previous: RunRecord,
    record: RunRecord,
    old_prompts: pd.DataFrame,
    prompts: pd.DataFrame,
    where: str,
) -> None:
    """Allow a rerun that resumes or only adds configurations or prompts; refuse anything else.

    Args:
        where: the output, after the field that chose it ("--out: PATH").
    """
    changes = []
    for path in FIXED_FIELDS:
        old, new = _lookup(previous, path), _lookup(record, path)
        if old != new:
            changes.append(
                f"{'.'.join(path[1:] if path[0] == 'spec' else path)}: {old!r} -> {new!r}"
            )
    # Every other model and adapter both runs name must be what it was: their images are in the
    # output (the first model is a fixed field).
    first = previous.model.ref
    for kind, old, new in (
        ("model", {r: m for r, m in previous.sources.items() if r != first}, record.sources),
        ("adapter", {a.ref: a for a in previous.adapters}, {a.ref: a for a in record.adapters}),
    ):
        for ref in sorted(old.keys() & new.keys()):
            if old[ref].identity != new[ref].identity:
                changes.append(
                    f"{kind} {ref}: {old[ref].identity[:19]} -> {new[ref].identity[:19]}"
                )
    missing = {c.config_id for c in previous.configs} - {c.config_id for c in record.configs}
    if missing:
        changes.append(f"configurations removed: {', '.join(sorted(missing))}")
    merged = old_prompts.merge(prompts, on="prompt_id", how="left", suffixes=("", "_new"))
    gone = merged[merged["prompt_new"].isna()]
    if len(gone):
        changes.append(f"{len(gone)} prompt(s) removed, first {gone['prompt_id'].iloc[0]!r}")
    kept = merged[merged["prompt_new"].notna()]
    edited = kept[
        (kept["prompt"] != kept["prompt_new"])
        | (kept["negative_prompt"].fillna("\0") != kept["negative_prompt_new"].fillna("\0"))
    ]
    if len(edited):
        changes.append(f"{len(edited)} prompt(s) changed, first {edited['prompt_id'].iloc[0]!r}")
    if changes:
        raise InputError(
            f"{where} holds a different job ({'; '.join(changes)}); "
            f"use --overwrite to start over, or {ELSEWHERE}"
        )


def _lookup(record: RunRecord, path: tuple[str, ...]) -> object:
    value: object = record
    for name in path:
        value = getattr(value, name)
    return value
