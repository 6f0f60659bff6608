"""`sdbatch status`: how far an output is, read from the output alone (it never starts Ray), so it
works from any machine that reads the storage, during a run or after it.

    >>> import sdbatch
    >>> now = sdbatch.status("tests/fixtures/output-0.1.0/output")
    >>> now.done, now.total, now.running
    (8, 8, False)
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone

from sdbatch.errors import InputError
from sdbatch.evaluation.record import read_metrics_record
from sdbatch.evaluation.shards import SHARDS
from sdbatch.lease import STALE_SECONDS, Holder, read_holder
from sdbatch.output import METRICS_DIR, Output
from sdbatch.records import FailedUnit, UnitMarker

# "images/s over the last minutes": long enough to span several unit commits of a GPU sweep,
# short enough to follow a change of pace (a node lost or added).
RATE_WINDOW_SECONDS = 300.0


@dataclass(frozen=True)
class ConfigProgress:
    """One configuration's images: committed, and in all."""

    config_id: str
    done: int
    total: int


@dataclass(frozen=True)
class EvalProgress:
    """Evaluation's feature extraction under one shard key (metrics/_shards/KEY; the key changes
    with the suite's CLIP model, extractor and per-image metrics): the generated units that
    have their shard."""

    shard_key: str
    units_done: int
    units: int


@dataclass(frozen=True)
class Status:
    """What an output holds and who is writing it, as read at `checked` (Unix time)."""

    output: str
    checked: float
    name: str | None  # the job's name; None until the run has written run.json
    configs: tuple[ConfigProgress, ...]
    # Units that failed every attempt in the last finished call and are not done since: a rerun
    # (or the call running now) retries them.
    failed: tuple[FailedUnit, ...]
    holder: Holder | None  # the driver holding the output (see sdbatch.lease)
    running: bool  # a holder that renewed its lease within lease.STALE_SECONDS
    last_commit: float | None = None  # Unix time of the latest unit commit (none in sdbatch 0.1)
    images_per_second: float | None = None  # over RATE_WINDOW_SECONDS; None: too few commits
    eta_seconds: float | None = None  # while running, at that rate
    evaluation: tuple[EvalProgress, ...] = ()
    metrics_finished: str | None = None  # when metrics.json was written (ISO 8601), if it was

    @property
    def done(self) -> int:
        return sum(c.done for c in self.configs)

    @property
    def total(self) -> int:
        return sum(c.total for c in self.configs)

    def to_json(self) -> str:
        """The status for scripts: every field, and done and total."""
        return json.dumps(
            {**dataclasses.asdict(self), "done": self.done, "total": self.total}, indent=2
        )

    def describe(self) -> list[str]:
        """The status for people, a line each."""
        lines = [f"{self.output}: " + self._overall()]
        if self.holder is not None:
            silent = self.checked - self.holder.renewed
            state = "running" if self.running else f"stale, not renewed for {silent:.0f} s"
            lines.append(f"held by {self.holder.describe()}: {state}")
        window = _duration(RATE_WINDOW_SECONDS)
        if self.images_per_second is not None:
            speed = f"{self.images_per_second:.2f} images/s over the last {window}"
            if self.eta_seconds is not None:
                at = datetime.fromtimestamp(self.checked + self.eta_seconds, timezone.utc)
                speed += f"; ETA {_duration(self.eta_seconds)} ({at:%Y-%m-%d %H:%M} UTC)"
            lines.append(speed)
        elif self.running:
            lines.append(f"images/s: measuring (under 2 commits in the last {window})")
        if self.last_commit is not None:
            lines.append(f"last unit committed {_duration(self.checked - self.last_commit)} ago")
        width = max((len(c.config_id) for c in self.configs), default=0)
        lines += [f"  {c.config_id:<{width}}  {c.done:>7,} / {c.total:,}" for c in self.configs]
        for f in self.failed:
            lines.append(
                f"failed: unit {f.unit_id} ({f.images} images, {f.attempts} attempts): {f.error}"
            )
        for e in self.evaluation:
            lines.append(
                f"eval {e.shard_key}: {e.units_done} of {e.units} units' features extracted"
            )
        if self.metrics_finished:
            lines.append(f"metrics written {self.metrics_finished}")
        return lines

    def _overall(self) -> str:
        if self.name is None:
            return "starting: no run.json yet"
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        return (
            f"job {self.name}, {self.done:,} of {self.total:,} images{share} in "
            f"{len(self.configs)} configurations"
        )


def status(output: str) -> Status:
    """How far `output` (a folder or URI) is: images per configuration, failed units, the lease
    holder, images/s and ETA, and evaluation's progress.

    Raises:
        InputError: `output` holds neither a run nor a lease, or a record sdbatch cannot read.
    """
    # 1. what the output holds, and who holds it
    out = Output(output)
    checked = time.time()
    holder = read_holder(out.fs, out.root)
    run = out.read_run()
    if run is None and holder is None:
        raise InputError(f"OUT: {out.uri} holds no sdbatch run (no run.json, no lease)")
    running = holder is not None and checked - holder.renewed <= STALE_SECONDS
    if run is None:  # the driver is still planning
        return Status(out.location, checked, None, (), (), holder, running)
    # Markers of another run identity are not this run's images (a rerun redoes their units).
    markers = [m for m in out.done_units() if m.run in ("", run.identity)]

    # 2. images per configuration, and the failures not made good since
    done = Counter[str]()
    for marker in markers:
        done[marker.config_id] += marker.images
    per_config = run.prompts.count * run.spec.sweep.images_per_prompt
    configs = tuple(ConfigProgress(c.config_id, done[c.config_id], per_config) for c in run.configs)
    made = {(m.config_id, pid) for m in markers for pid in m.prompt_ids}
    failed = tuple(
        f
        for f in (run.history[-1].failed_units if run.history else ())
        if any((f.config_id, pid) not in made for pid in f.prompt_ids)
    )

    # 3. pace: from the commits' times; an ETA only while a driver is at work
    commits = [(m.committed, m.images) for m in markers if m.committed]
    last = max((t for t, _ in commits), default=None)
    speed = None
    if last is not None:
        speed = images_per_second(commits, max(checked, last) if running else last)
    left = sum(c.total - c.done for c in configs)
    eta = left / speed if running and speed and left else None

    # 4. evaluation: shards of this output's units, per shard key
    metrics = read_metrics_record(out)
    return Status(
        output=out.location,
        checked=checked,
        name=run.spec.name,
        configs=configs,
        failed=failed,
        holder=holder,
        running=running,
        last_commit=last,
        images_per_second=speed,
        eta_seconds=eta,
        evaluation=_evaluation(out, markers),
        metrics_finished=metrics.finished if metrics else None,
    )


def images_per_second(
    commits: list[tuple[float, int]], end: float, window: float = RATE_WINDOW_SECONDS
) -> float | None:
    """Images per second over the `window` seconds up to `end`, from (Unix time, images) commits.

    The first commit in the window starts the clock and its images are not counted (they were
    made before it, from an unknown start), so model loading and an idle start do not dilute
    the pace; a job that stops committing slows down as `end` moves on. None: under 2 commits.
    """
    recent = sorted(c for c in commits if end - window <= c[0] <= end)
    if len(recent) < 2 or end <= recent[0][0]:
        return None
    return sum(images for _, images in recent[1:]) / (end - recent[0][0])


def _evaluation(out: Output, markers: list[UnitMarker]) -> tuple[EvalProgress, ...]:
    folder = out.path(METRICS_DIR, SHARDS)
    if not out.fs.exists(folder):
        return ()
    units = {m.unit_id for m in markers}
    found = []
    for key in sorted(out.fs.ls(folder, detail=False)):
        shards = {_name(p).removesuffix(".npz") for p in out.fs.ls(key, detail=False)}
        found.append(EvalProgress(_name(key), len(shards & units), len(units)))
    return tuple(found)


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _duration(seconds: float) -> str:
    seconds = max(seconds, 0)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
