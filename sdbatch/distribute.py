"""Ray: join or start a cluster, place one worker actor per GPU (or N CPU actors), and hand out
work units one at a time, so fast actors take more of them.

Each actor is a plain worker class made remote (`worker.Worker` generates, `features.FeatureWorker`
extracts features). Its `run(unit)` streams one count per finished batch, which drives a single
progress bar over all actors, and ends with the unit's result (a done marker, shard statistics).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections import deque
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from sdbatch.errors import InputError, JobFailed
from sdbatch.spec import EvalRuntime, Runtime

log = logging.getLogger("sdbatch")
# transformers warns at import about optional vision backends; workers only need errors.
ACTOR_ENV = {"TRANSFORMERS_VERBOSITY": "error"}


@dataclass(frozen=True)
class ActorPlan:
    """How many worker actors, and what each one reserves."""

    count: int
    gpus: int
    cpus: float
    threads: int | None

    def describe(self) -> str:
        kind = "GPU" if self.gpus else "CPU"
        return f"{self.count} {kind} actor{'s' if self.count > 1 else ''}"


def connect(address: str | None) -> bool:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start a local one.

    Returns True when this call connected, so the caller knows to disconnect; a session already
    connected (a notebook, a test) is reused and left as it was.
    """
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    return True


def plan_actors(runtime: Runtime | EvalRuntime) -> ActorPlan:
    """One actor per GPU when the cluster has GPUs; otherwise `runtime.actors` CPU actors."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        count = gpus if runtime.actors == "auto" else runtime.actors
        if count > gpus:
            log.warning(
                "runtime.actors=%d but the cluster has %d GPUs; Ray waits for more", count, gpus
            )
        return ActorPlan(count, gpus=1, cpus=1, threads=None)
    count = 1 if runtime.actors == "auto" else runtime.actors
    cpus = resources.get("CPU", 1)
    largest_node = max(n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"])
    # Share the cores: more actors than cores is allowed (fractional reservations), never fewer
    # cores than one thread each.
    share = min(cpus / count, largest_node)
    return ActorPlan(count, gpus=0, cpus=share, threads=max(1, int(share)))


def resolve_dtype(requested: str, plan: ActorPlan) -> str:
    """'auto' means fp16 on GPUs and fp32 on CPUs."""
    if requested == "auto":
        return "fp16" if plan.gpus else "fp32"
    if requested == "fp16" and not plan.gpus:
        raise InputError(
            "runtime.dtype: fp16 needs GPUs and this cluster has none; use fp32 or bf16"
        )
    return requested


@dataclass
class RunResult:
    """Where the actors ran, the seconds from the first one ready to the last unit's end, and
    each unit's result (the last item its `run` yielded) by unit id."""

    workers: list[dict[str, Any]]
    seconds: float
    results: dict[str, Any] = dataclasses.field(default_factory=dict)


def run_units(
    worker: type,
    settings: Any,
    units: list[Any],
    plan: ActorPlan,
    progress: tuple[int, int, str],
) -> RunResult:
    """Run every unit on `plan.count` actors of class `worker`, giving each idle one the next unit.

    Args:
        worker: a class with `describe()` and a generator `run(unit)`, built from `settings`
            (a dataclass with a `threads` field).
        progress: (total images, images already done, what the bar says it is doing).

    Raises:
        JobFailed: an actor failed to load its models or a unit raised; finished units stay.
    """
    import ray

    remote = ray.remote(worker).options(
        num_gpus=plan.gpus, num_cpus=plan.cpus, runtime_env={"env_vars": ACTOR_ENV}
    )
    actors = [
        remote.remote(dataclasses.replace(settings, threads=plan.threads))
        for _ in range(plan.count)
    ]
    log.info("starting %s (each loads the model once)", plan.describe())
    loading = {actor.describe.remote(): actor for actor in actors}
    pending = deque(units)
    running: dict[Any, tuple[Any, Any]] = {}
    idle: list[Any] = []
    result = RunResult([], 0.0)
    bar = None
    try:
        while pending or running:
            while idle and pending:
                actor = idle.pop()
                unit = pending.popleft()
                running[actor.run.remote(unit)] = (actor, unit)
            ready, _ = ray.wait([*loading, *running], num_returns=1, timeout=1.0)
            if bar is not None:
                bar.update(0)  # keeps elapsed time and ETA moving between batches
            for ref in ready:
                if ref in loading:
                    actor = loading.pop(ref)
                    result.workers.append(_get(ref, "a worker failed to load the model"))
                    idle.append(actor)
                    # Throughput is counted from the first loaded worker: model loading is not
                    # generation speed.
                    bar = bar or _progress_bar(*progress)
                    continue
                actor, unit = running[ref]
                try:
                    item = _get(next(ref), f"unit {unit.unit_id} failed")
                except StopIteration:
                    del running[ref]
                    idle.append(actor)
                    continue
                if isinstance(item, int):  # a batch; the last item is the unit's result
                    bar.update(item)
                else:
                    result.results[unit.unit_id] = item
    finally:
        if bar is not None:
            result.seconds = bar.format_dict["elapsed"]
            bar.close()
        for actor in actors:
            ray.kill(actor)
    return result


def _progress_bar(total: int, done: int, doing: str) -> tqdm:
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=done,
        unit="img",
        desc=doing,
        dynamic_ncols=True,
        smoothing=0.1,
        # A log file gets a line every 30 s rather than a stream of carriage returns.
        mininterval=0.5 if interactive else 30,
    )


def _get(ref: Any, what: str) -> Any:
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayError as e:
        raise JobFailed(f"{what}: {e}") from e
