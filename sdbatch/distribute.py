"""Ray: join or start a cluster, place one worker actor per GPU (or N CPU actors), and hand out
work units one at a time, so fast actors take more of them.

Units may have an affinity (generation's: the model they need): an actor then takes the units of
the model it holds, and moves to another only when that one's units would otherwise wait, so each
model is loaded about once per actor that needs it.
Each actor is a plain worker class made remote (`worker.Worker` generates,
`evaluation.worker.FeatureWorker` extracts features). Its `run(unit)` streams one count per
finished batch, which drives a single progress bar over all actors (plain log lines with the
rate and ETA when stderr is not a terminal: a log file, `ray job logs`), and ends with the unit's
result (a done marker, shard statistics).
Units are retried when they raise, their actor dies or stops making progress (its deadline is
derived from the job's observed batch times); dead and stuck actors are replaced. A job whose
cluster has no live node left that can place a worker stops, instead of waiting for one forever.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from sdbatch.errors import InputError, JobFailed, described, first_line, stop_if_requested

log = logging.getLogger("sdbatch")
AUTH_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"
# A local Ray instance serves this machine only. Ray binds its servers (GCS, raylet, workers,
# object manager) to the node's address, which is the machine's network address unless Ray runs
# "without clusters", when it is 127.0.0.1; in Ray 2.60 nothing else makes it loopback (ray.init
# turns `_node_ip_address="127.0.0.1"` back into the network address).
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Joining a cluster: ray.init retries an address nobody answers at for about 14 minutes.
CONNECT_SECONDS = 10
ASK_CLUSTER_ID = """
import sys
from ray._raylet import GcsClient
try:
    GcsClient(address=sys.argv[1])
except Exception as e:
    print(f"{type(e).__name__}: {e}".splitlines()[0])
"""
# A unit whose actor reports nothing (a finished batch, or the unit's result) for STALL_FACTOR
# times the longest wait for a report seen so far in the job, and at least STALL_MIN_SECONDS
# (a replacement actor's first batch warms up), is given up on like a failed attempt; a warning
# names it at half that, and a unit's deadline doubles each time it is given up on. Until the
# job's first report there is nothing to derive a deadline from, and none applies.
STALL_FACTOR = 10
STALL_MIN_SECONDS = 60.0
# How often, while a worker waits to be placed, the driver checks that a live node can take it.
PLACEMENT_CHECK_SECONDS = 5.0
# Progress when stderr is not a terminal (a log file, `ray job logs`): a line this often.
LOG_PROGRESS_SECONDS = 30.0


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
    block; a session already connected (a notebook, a test) is used and left as it was.

    Raises:
        InputError: no Ray cluster answers at the address within CONNECT_SECONDS, or it
            refuses us (a token we lack).
    """
    import ray

    if ray.is_initialized():
        yield
        return
    starts_local = _check_cluster(address)
    sigterm = signal.getsignal(signal.SIGTERM)
    # Ray announces on every new local instance that it turned token authentication on (its
    # default, which stays); sdbatch starts one per run, so the notice would open every run.
    notice = logging.getLogger(AUTH_NOTICE_LOGGER)
    level = notice.level
    if starts_local:
        notice.setLevel(logging.ERROR)
    try:
        with _loopback_only() if starts_local else nullcontext():
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    finally:
        notice.setLevel(level)
    # ray.init makes SIGTERM exit at once (status 15); a handler the caller set (the CLI's, which
    # stops like Ctrl-C) stays in charge.
    if callable(sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, sigterm)
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def _loopback_only() -> Iterator[None]:
    """Within the block, a Ray instance that starts binds to loopback only; the setting is
    restored after it, so that a later session in this process may join a cluster."""
    from ray._private import ray_constants

    before = os.environ.get(LOCAL_ONLY_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOCAL_ONLY_ENV] = "0"  # for the processes ray.init starts (GCS, raylet, workers)
    ray_constants.ENABLE_RAY_CLUSTER = False  # this process read the variable at import
    try:
        yield
    finally:
        if before[0] is None:
            os.environ.pop(LOCAL_ONLY_ENV)
        else:
            os.environ[LOCAL_ONLY_ENV] = before[0]
        ray_constants.ENABLE_RAY_CLUSTER = before[1]


def _check_cluster(address: str | None) -> bool:
    """Raise InputError within seconds when the cluster `address` (or $RAY_ADDRESS, or 'auto')
    names does not answer, or refuses us; ray.init would retry for minutes, then print a
    traceback. Returns whether ray.init will start a local instance instead."""
    from ray._private.services import canonicalize_bootstrap_address

    if "://" in (address or os.environ.get("RAY_ADDRESS", "")):
        return False  # Ray Client (ray://): ray.init has its own time limit
    field = "--address" if address else "RAY_ADDRESS"
    try:
        gcs = canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError) as e:
        raise InputError(f"{field}: {first_line(e)}") from None
    if gcs is None:
        return True
    host, port = gcs.rsplit(":", 1)
    try:
        socket.create_connection((host.strip("[]"), int(port)), CONNECT_SECONDS).close()
    except OSError as e:
        raise InputError(f"{field}: no Ray cluster at {gcs} ({first_line(e)})") from None
    # Something listens there: ask it for its cluster id, as ray.init would first. Ray's client
    # retries for 40 s, logging to the process's stderr: a child process asks, and is cut short.
    try:
        asked = subprocess.run(
            [sys.executable, "-c", ASK_CLUSTER_ID, gcs],
            capture_output=True, text=True, timeout=CONNECT_SECONDS,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise InputError(
            f"{field}: {gcs} does not answer as a Ray cluster within {CONNECT_SECONDS} s"
        ) from None
    answer = asked.stdout.strip()  # the error, if any
    if answer.startswith("AuthenticationError"):
        raise InputError(
            f"{field}: the Ray cluster at {gcs} requires its authentication token; set "
            "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to it"
        )
    if answer:
        raise InputError(f"{field}: cannot join the Ray cluster at {gcs}: {answer}")
    return False


def has_cluster(address: str | None) -> bool:
    """Whether `session(address)` would use a cluster that exists (one named by `address` or
    $RAY_ADDRESS, or a session already connected: a notebook's, a test's) rather than start a
    Ray instance on this machine: known before Ray starts."""
    if address or os.environ.get("RAY_ADDRESS"):
        return True
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def local_without_gpu(address: str | None) -> bool:
    """Whether `session(address)` would start a Ray instance on this machine, which has no GPU:
    known before Ray starts."""
    if has_cluster(address):
        return False  # its cluster decides
    import torch

    return not torch.cuda.is_available()


def on_every_node(
    function: Callable[..., Any], *args: Any, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """`function(*args)`'s result on every live node of the cluster (a task pinned to each, that
    reserves no CPU, so busy nodes run it too, with `env` in its environment), by the node's host
    name and id.

    Raises:
        JobFailed: it raised on a node, or the node was lost; naming the node.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(function)
    refs = {
        f"{node['NodeManagerHostname']} (node {node['NodeID'][:8]})": task.options(
            num_cpus=0,
            runtime_env={"env_vars": env} if env else None,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
        ).remote(*args)
        for node in ray.nodes()
        if node["Alive"]
    }
    results = {}
    for node, ref in refs.items():
        try:
            results[node] = ray.get(ref)
        except ray.exceptions.RayError as e:
            raise JobFailed(f"on {node}: {_reason(e)}") from e
    return results


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
    return cpu_actors(1 if actors == "auto" else actors)


def cpus_per_gpu() -> int:
    """The fewest CPU cores a GPU has beside it on any live node with GPUs (at least 1): what a
    GPU actor may use for its CPU-side work without crowding the node's other GPUs' actors."""
    import ray

    shares = [
        n["Resources"].get("CPU", 0) / n["Resources"]["GPU"]
        for n in ray.nodes()
        if n["Alive"] and n["Resources"].get("GPU")
    ]
    return max(1, int(min(shares, default=1)))


def cpu_actors(count: int) -> ActorPlan:
    """`count` CPU actors sharing the cluster's cores, each one's share reserved."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 1)
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
    unit's result (the last item its `run` yielded) by unit id, the units that failed every
    attempt, with their last error, and a unit's id for each attempt given up on because it
    made no progress."""

    workers: list[dict[str, Any]]
    seconds: float
    results: dict[str, Any] = dataclasses.field(default_factory=dict)
    failed: dict[str, Failure] = dataclasses.field(default_factory=dict)
    stalled: list[str] = dataclasses.field(default_factory=list)


@dataclass
class _Running:
    """A unit on an actor, whether its turn there began (a unit queued behind another waits,
    which is no stall), and when the actor last reported progress on it."""

    actor: Any
    unit: Any
    started: bool
    heard: float = dataclasses.field(default_factory=time.monotonic)
    warned: bool = False


def run_units(
    worker: type,
    setup: Any,
    units: list[Any],
    plan: ActorPlan,
    progress: tuple[int, int, str],
    retries: int,
    split: Callable[[Any], list[Any]] | None = None,
    affinity: Callable[[Any], str] | None = None,
    env: dict[str, str] | None = None,
) -> RunResult:
    """Run every unit on `plan.count` actors of class `worker`, giving each one the next unit.

    An actor holds up to `worker.UNITS_IN_FLIGHT` units (default 1): with 2 it gets its next unit
    while the current one runs, so it never waits for the driver between units; its `run` takes
    them in turn, yielding 0 when a unit's turn begins.

    A unit that raises is put back in the queue, so another actor may take it; one whose actor
    process dies (killed, out of host memory, node lost) or stops reporting progress (see
    STALL_FACTOR) likewise, and the actor is replaced.
    After `retries` retries a unit is given up on and listed in `RunResult.failed`, or, given
    `split`, bisected: its halves run once each, and halves that fail are split again, so only
    the inputs at fault fail and the rest of the unit is done. The other units go on.

    Args:
        worker: a class with `describe()` and a generator `run(unit)`, built from `setup`
            (a dataclass with `threads` and `log_dir` fields: what every actor loads).
        progress: (total images, images already done, what the bar says it is doing).
        split: a unit's halves (none for a unit that cannot be split).
        affinity: what a unit needs loaded (a model); then `setup` has an `affinity` field,
            which each actor is started with, and units go to actors holding what they need.
        env: environment variables the actors need before they import anything. Ray then
            starts a worker process for each (seconds) instead of taking one it started ahead.

    Raises:
        JobFailed: a worker could not load its models, actors kept dying while loading them, or
            no live node can place a worker; finished units stay.
    """
    import ray

    runtime_env = {"env_vars": env} if env else None
    depth = getattr(worker, "UNITS_IN_FLIGHT", 1)
    # A threaded actor: each unit in flight runs `run` in a thread of its own (Ray streams
    # generators from threaded actors as from plain ones).
    remote = ray.remote(worker).options(
        num_gpus=plan.gpus, num_cpus=plan.cpus, runtime_env=runtime_env, max_concurrency=depth
    )
    actor_setup = dataclasses.replace(setup, threads=plan.threads)
    actors: list[Any] = []
    loading: dict[Any, Any] = {}
    holds: dict[Any, str] = {}  # actor -> what it has loaded (with `affinity`)
    described: dict[Any, int] = {}  # actor -> its entry in result.workers
    ready: list[Any] = []  # loaded actors, in the order they became ready

    def start_actor() -> None:
        if affinity is None:
            actor = remote.remote(actor_setup)
        else:
            key = _least_served(pending, affinity, holds) or affinity(units[0])
            actor = remote.remote(dataclasses.replace(actor_setup, affinity=key))
            holds[actor] = key
        actors.append(actor)
        loading[actor.describe.remote()] = actor

    def replace(actor: Any) -> None:
        holds.pop(actor, None)
        if actor in ready:
            ready.remove(actor)
        _replace(actor, actors, start_actor)

    log.info("starting %s (each loads the model once)", plan.describe())
    pending = deque(units)
    for _ in range(plan.count):
        start_actor()
    # A node lost while its actor loads is not the model's fault: replace it, a few times.
    load_deaths_allowed = plan.count * (retries + 1)
    running: dict[Any, _Running] = {}
    slowest = 0.0  # the longest wait for a unit's next report so far
    placement_checked = time.monotonic()
    attempts: Counter[str] = Counter()  # by this unit id
    inherited: dict[str, int] = {}  # attempts made on a piece's work as part of a larger unit
    allowed: dict[str, int] = {}  # retries of a piece (none: its failure already repeated)
    counted: Counter[str] = Counter()  # images the bar counted for a unit's current attempt
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

    def held_by(actor: Any) -> list[Any]:
        return [ref for ref, job in running.items() if job.actor is actor]

    def ended(ref: Any) -> None:
        """`ref`'s unit is over; the next one its actor holds has its turn now."""
        actor = running.pop(ref).actor
        for job in (running[r] for r in held_by(actor)):
            if not job.started:
                job.started, job.heard = True, time.monotonic()

    def drop(actor: Any, blamed: dict[str, str]) -> None:
        """Replace `actor` and give back every unit it holds: those `blamed` (by unit id, with
        the reason) count an attempt; the others (waiting their turn, or innocent of a stall)
        go back to the front of the queue, uncounted."""
        for ref in held_by(actor):
            unit = running.pop(ref).unit
            if unit.unit_id in blamed:
                give_back(unit, blamed[unit.unit_id])
            else:
                if bar is not None:
                    bar.update(-counted.pop(unit.unit_id, 0))
                pending.appendleft(unit)
        replace(actor)

    def hand_out() -> None:
        """Fill the actors' first slots, then their further ones, keeping a unit for each actor
        still loading (a queued unit would wait while a fresh actor had none)."""
        for slot in range(depth):
            for actor in ready:
                if slot and len(pending) <= len(loading):
                    return
                if len(held_by(actor)) == slot:
                    unit = _next_unit(pending, actor, affinity, holds)
                    if unit is not None:
                        running[actor.run.remote(unit)] = _Running(actor, unit, started=not slot)

    try:
        while pending or running:
            stop_if_requested()
            hand_out()
            reported, _ = ray.wait([*loading, *running], num_returns=1, timeout=1.0)
            if bar is not None:
                bar.update(0)  # keeps elapsed time and ETA moving between batches
            for ref in reported:
                if ref in loading:
                    actor = loading.pop(ref)
                    try:
                        result.workers.append(ray.get(ref))
                    except ray.exceptions.RayActorError as e:
                        if e.actor_init_failed or load_deaths_allowed == 0:
                            raise JobFailed(f"a worker failed to load: {_reason(e)}") from e
                        load_deaths_allowed -= 1
                        log.warning("a worker died while loading; starting another")
                        replace(actor)
                        continue
                    except ray.exceptions.RayError as e:
                        raise JobFailed(f"a worker failed to load: {_reason(e)}") from e
                    described[actor] = len(result.workers) - 1
                    ready.append(actor)
                    # Throughput is counted from the first loaded worker: model loading is not
                    # generation speed.
                    bar = bar or progress_bar(*progress)
                    continue
                if ref not in running:
                    continue  # given back with its actor's other unit, just now
                job = running[ref]
                actor, unit = job.actor, job.unit
                try:
                    item = ray.get(next(ref))
                except StopIteration:
                    ended(ref)
                    continue
                except ray.exceptions.RayActorError as e:
                    log.warning("a worker died during unit %s; starting another", unit.unit_id)
                    # Each unit whose turn had begun may have been the cause.
                    died = f"worker died: {_reason(e)}"
                    held = [running[r] for r in held_by(actor)]
                    drop(actor, {j.unit.unit_id: died for j in held if j.started})
                    continue
                except ray.exceptions.RayError as e:
                    ended(ref)
                    if isinstance(e, ray.exceptions.RayTaskError) and isinstance(
                        e.cause, JobFailed
                    ):
                        raise e.cause from None  # no unit's fault: retrying would not help
                    give_back(unit, _reason(e))
                    continue
                heard = time.monotonic()
                if job.started:
                    slowest = max(slowest, heard - job.heard)
                job.started, job.heard = True, heard
                if isinstance(item, int):  # a batch; the last item is the unit's result
                    bar.update(item)
                    counted[unit.unit_id] += item
                else:
                    result.results[unit.unit_id] = item
                    counted.pop(unit.unit_id, None)
            now = time.monotonic()
            if loading and now - placement_checked > PLACEMENT_CHECK_SECONDS:
                placement_checked = now
                _check_placeable(plan)
            late = _stalled(running, slowest, now, result.stalled)
            result.stalled += [job.unit.unit_id for job in late]
            blamed = {
                j.unit.unit_id: f"stalled: no progress for {now - j.heard:.0f} s" for j in late
            }
            for actor in {job.actor: None for job in late}:
                drop(actor, blamed)
        _describe_again(described, actors, result.workers)
    finally:
        if bar is not None:
            result.seconds = bar.format_dict["elapsed"]
            bar.close()
        for actor in actors:
            ray.kill(actor)
    if setup.log_dir and Path(setup.log_dir).is_dir():
        log.info("the workers' library warnings are in %s", setup.log_dir)
    return result


def _next_unit(
    pending: deque, actor: Any, affinity: Callable[[Any], str] | None, holds: dict[Any, str]
) -> Any:
    """The unit `actor` takes next, removed from `pending`; None: it waits.

    Without affinity, the first unit. With it, the first unit of what the actor holds; if none
    is left, it moves to what has the most units waiting per actor holding it, unless every
    such unit has an actor already (a load costs more than waiting for the last units).
    """
    if not pending:
        return None
    if affinity is None:
        return pending.popleft()
    key = holds[actor]
    if not any(affinity(u) == key for u in pending):
        key = _least_served(pending, affinity, holds)
        if key is None:
            return None
        holds[actor] = key
    unit = next(u for u in pending if affinity(u) == key)
    pending.remove(unit)
    return unit


def _least_served(
    pending: deque, affinity: Callable[[Any], str], holds: dict[Any, str]
) -> str | None:
    """What has the most waiting units per actor holding it, counting only where units
    outnumber those actors (one would wait); None where none would."""
    waiting = Counter(affinity(u) for u in pending)
    served = Counter(holds.values())
    short = {k: n / (served[k] + 1) for k, n in waiting.items() if n > served[k]}
    return max(short, key=short.__getitem__, default=None)


def _describe_again(described: dict[Any, int], actors: list[Any], workers: list) -> None:
    """Each live actor's description at the end (its load counts); an actor that does not
    answer within seconds keeps the one it gave when it started."""
    import ray

    live = [a for a in actors if a in described]
    try:
        infos = ray.get([a.describe.remote() for a in live], timeout=30)
        for actor, info in zip(live, infos, strict=True):
            workers[described[actor]] = info
    except ray.exceptions.RayError as e:
        log.warning("could not ask the workers for their final counts: %s", _reason(e))


def _stalled(
    running: dict[Any, _Running], slowest: float, now: float, stalled: list[str]
) -> list[_Running]:
    """The units whose turn began and that are past their progress deadline; warns once of each
    at half of it.

    A unit's deadline doubles each time it was given up on: one far heavier than every unit
    seen so far (a larger size, many more steps) gets through on a later attempt.
    """
    if not slowest:
        return []
    late = []
    for job in running.values():
        if not job.started:
            continue
        deadline = max(STALL_MIN_SECONDS, STALL_FACTOR * slowest)
        deadline *= 2 ** stalled.count(job.unit.unit_id)
        quiet = now - job.heard
        if quiet > deadline:
            log.warning(
                "unit %s made no progress for %.0f s; stopping its worker and starting another",
                job.unit.unit_id, quiet,
            )  # fmt: skip
            late.append(job)
        elif quiet > deadline / 2 and not job.warned:
            job.warned = True
            log.warning(
                "unit %s is slow: no progress for %.0f s (the longest wait so far was %.1f s); "
                "it is given up on at %.0f s",
                job.unit.unit_id, quiet, slowest, deadline,
            )  # fmt: skip
    return late


def _check_placeable(plan: ActorPlan) -> None:
    """Raise JobFailed when no live node has what a worker reserves, so Ray can place none and
    would wait forever (the node's raylet died, or the node was lost)."""
    import ray

    for node in ray.nodes():
        has = node["Resources"]
        if node["Alive"] and has.get("CPU", 0) >= plan.cpus and has.get("GPU", 0) >= plan.gpus:
            return
    need = f"{plan.gpus} GPU" if plan.gpus else f"{plan.cpus:g} CPU"
    raise JobFailed(
        f"no live Ray node can take a worker ({need}): the cluster lost its nodes, or their "
        "raylet died"
    )


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
    return described(error)


def progress_bar(total: int, done: int, doing: str) -> tqdm:
    """One bar over every image of a run: a terminal's, or a log line now and then."""
    if not sys.stderr.isatty():
        return _LogProgress(
            total=total, initial=done, desc=doing, mininterval=LOG_PROGRESS_SECONDS,
            file=io.StringIO(),  # it logs instead; the bar's closing newline goes nowhere
        )  # fmt: skip
    return tqdm(
        total=total,
        initial=done,
        unit="img",
        desc=doing,
        dynamic_ncols=True,
        smoothing=0.1,
        mininterval=0.5,
    )


class _LogProgress(tqdm):
    """The progress bar as a plain log line every LOG_PROGRESS_SECONDS, and one at the end: a
    bar's carriage returns would pile up on one line of a log file or of `ray job logs`."""

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        d = self.format_dict
        done, total, elapsed = d["n"], d["total"], d["elapsed"]
        line = f"{d['prefix']}: {done}/{total} images ({100 * done // max(total, 1)}%)"
        # The rate smoothed over the last intervals; once closed (`disable`), the average.
        rate = d["rate"] or ((done - d["initial"]) / elapsed if self.disable else 0.0)
        if rate:
            line += f", {rate:.2f} images/s"
        if self.disable:
            line += f", {self.format_interval(elapsed)} elapsed"
        elif rate:
            line += f", ETA {self.format_interval((total - done) / rate)}"
        log.info("%s", line)
        return True
