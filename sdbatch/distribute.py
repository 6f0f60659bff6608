"""Ray: join or start a cluster, place one worker actor per GPU (or N CPU actors), and hand out
work units one at a time, so fast actors take more of them.

Each actor is a plain worker class made remote (`worker.Worker` generates,
`evaluation.worker.FeatureWorker` extracts features). Its `run(unit)` streams one count per
finished batch, which drives a single progress bar over all actors, and ends with the unit's
result (a done marker, shard statistics).
Units are retried when they raise or their actor dies; dead actors are replaced.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from tqdm import tqdm

from sdbatch.errors import InputError, JobFailed, first_line

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


@contextmanager
def session(address: str | None) -> Iterator[None]:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start a local one, for the `with`
    block; a session already connected (a notebook, a test) is used and left as it was."""
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


def local_without_gpu(address: str | None) -> bool:
    """Whether `session(address)` would start a Ray instance on this machine, which has no GPU:
    known before Ray starts."""
    import os

    if address or os.environ.get("RAY_ADDRESS"):
        return False
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return False  # a session of a notebook or a test: its cluster decides
    import torch

    return not torch.cuda.is_available()


def plan_actors(actors: int | Literal["auto"]) -> ActorPlan:
    """One actor per GPU when the cluster has GPUs; otherwise `actors` CPU actors (1 for auto)."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        count = gpus if actors == "auto" else actors
        if count > gpus:
            log.warning(
                "runtime.actors=%d but the cluster has %d GPUs; Ray waits for more", count, gpus
            )
        return ActorPlan(count, gpus=1, cpus=1, threads=None)
    count = 1 if actors == "auto" else actors
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


@dataclass(frozen=True)
class Failure:
    """A unit given up on: how many times its work was tried and the last error (one line)."""

    unit: Any
    attempts: int
    error: str


@dataclass
class RunResult:
    """Where the actors ran, the seconds from the first one ready to the last unit's end, each
    unit's result (the last item its `run` yielded) by unit id, and the units that failed every
    attempt, with their last error."""

    workers: list[dict[str, Any]]
    seconds: float
    results: dict[str, Any] = dataclasses.field(default_factory=dict)
    failed: dict[str, Failure] = dataclasses.field(default_factory=dict)


def run_units(
    worker: type,
    setup: Any,
    units: list[Any],
    plan: ActorPlan,
    progress: tuple[int, int, str],
    retries: int,
    split: Callable[[Any], list[Any]] | None = None,
) -> RunResult:
    """Run every unit on `plan.count` actors of class `worker`, giving each idle one the next unit.

    A unit that raises is put back in the queue, so another actor may take it; one whose actor
    process dies (killed, out of host memory, node lost) likewise, and the actor is replaced.
    After `retries` retries a unit is given up on and listed in `RunResult.failed`, or, given
    `split`, bisected: its halves run once each, and halves that fail are split again, so only
    the inputs at fault fail and the rest of the unit is done. The other units go on.

    Args:
        worker: a class with `describe()` and a generator `run(unit)`, built from `setup`
            (a dataclass with a `threads` field: what every actor loads).
        progress: (total images, images already done, what the bar says it is doing).
        split: a unit's halves (none for a unit that cannot be split).

    Raises:
        JobFailed: a worker could not load its models, or actors kept dying while loading them;
            finished units stay.
    """
    import ray

    remote = ray.remote(worker).options(
        num_gpus=plan.gpus, num_cpus=plan.cpus, runtime_env={"env_vars": ACTOR_ENV}
    )
    actor_setup = dataclasses.replace(setup, threads=plan.threads)
    actors: list[Any] = []
    loading: dict[Any, Any] = {}

    def start_actor() -> None:
        actor = remote.remote(actor_setup)
        actors.append(actor)
        loading[actor.describe.remote()] = actor

    log.info("starting %s (each loads the model once)", plan.describe())
    for _ in range(plan.count):
        start_actor()
    # A node lost while its actor loads is not the model's fault: replace it, a few times.
    load_deaths_allowed = plan.count * (retries + 1)
    pending = deque(units)
    running: dict[Any, tuple[Any, Any]] = {}
    attempts: Counter[str] = Counter()  # by this unit id
    inherited: dict[str, int] = {}  # attempts made on a piece's work as part of a larger unit
    allowed: dict[str, int] = {}  # retries of a piece (none: its failure already repeated)
    counted: Counter[str] = Counter()  # images the bar counted for a unit's current attempt
    idle: list[Any] = []
    result = RunResult([], 0.0)
    bar = None

    def give_back(unit: Any, error: str) -> None:
        if bar is not None:
            bar.update(-counted.pop(unit.unit_id, 0))
        attempts[unit.unit_id] += 1
        own, limit = attempts[unit.unit_id], allowed.get(unit.unit_id, retries)
        if own <= limit:
            log.warning(
                "unit %s failed (attempt %d of %d), will retry: %s",
                unit.unit_id, own, limit + 1, error,
            )  # fmt: skip
            pending.append(unit)
            return
        tries = own + inherited.get(unit.unit_id, 0)
        pieces = split(unit) if split else []
        for piece in pieces:
            inherited[piece.unit_id], allowed[piece.unit_id] = tries, 0
            pending.append(piece)
        if pieces:
            log.warning("unit %s failed %d times; splitting it: %s", unit.unit_id, tries, error)
        else:
            log.error("unit %s failed %d times, giving up: %s", unit.unit_id, tries, error)
            result.failed[unit.unit_id] = Failure(unit, tries, error)

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
                    try:
                        result.workers.append(ray.get(ref))
                    except ray.exceptions.RayActorError as e:
                        if e.actor_init_failed or load_deaths_allowed == 0:
                            raise JobFailed(f"a worker failed to load: {_reason(e)}") from e
                        load_deaths_allowed -= 1
                        log.warning("a worker died while loading; starting another")
                        _replace(actor, actors, start_actor)
                        continue
                    except ray.exceptions.RayError as e:
                        raise JobFailed(f"a worker failed to load: {_reason(e)}") from e
                    idle.append(actor)
                    # Throughput is counted from the first loaded worker: model loading is not
                    # generation speed.
                    bar = bar or _progress_bar(*progress)
                    continue
                actor, unit = running[ref]
                try:
                    item = ray.get(next(ref))
                except StopIteration:
                    del running[ref]
                    idle.append(actor)
                    continue
                except ray.exceptions.RayActorError as e:
                    del running[ref]
                    log.warning("a worker died during unit %s; starting another", unit.unit_id)
                    _replace(actor, actors, start_actor)
                    give_back(unit, f"worker died: {_reason(e)}")
                    continue
                except ray.exceptions.RayError as e:
                    del running[ref]
                    if isinstance(e, ray.exceptions.RayTaskError) and isinstance(
                        e.cause, JobFailed
                    ):
                        raise e.cause from None  # no unit's fault: retrying would not help
                    idle.append(actor)
                    give_back(unit, _reason(e))
                    continue
                if isinstance(item, int):  # a batch; the last item is the unit's result
                    bar.update(item)
                    counted[unit.unit_id] += item
                else:
                    result.results[unit.unit_id] = item
                    counted.pop(unit.unit_id, None)
    finally:
        if bar is not None:
            result.seconds = bar.format_dict["elapsed"]
            bar.close()
        for actor in actors:
            ray.kill(actor)
    return result


def _replace(actor: Any, actors: list[Any], start_actor: Any) -> None:
    import ray

    actors.remove(actor)
    ray.kill(actor)  # a half-dead actor (node unreachable) must not come back and take work
    start_actor()


def _reason(error: Exception) -> str:
    """One line: the exception a unit raised inside its actor, or why Ray lost the actor."""
    import ray

    if isinstance(error, ray.exceptions.RayTaskError) and error.cause is not None:
        error = error.cause
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()  # Ray colours its messages
    if isinstance(error, ray.exceptions.RayActorError):
        # Ray's text is a header, tab-indented ids, then the cause: for a failed __init__ its
        # traceback, whose last line is the exception; for a death, why the process died.
        lines = [line.strip() for line in text.splitlines() if line.strip() and line[0] != "\t"]
        if not lines:
            return type(error).__name__
        if error.actor_init_failed:
            return lines[-1]
        why = (lines[1:] or lines)[0]
        # Ray goes on to list every possible cause; the first sentences are the facts.
        return why if len(why) <= 160 else why[:160].rsplit(" ", 1)[0] + " ..."
    return f"{type(error).__name__}: {first_line(error)}" if text else type(error).__name__


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
