"""One driver per output: a lease file naming its holder, renewed while the holder lives.

`_lease.json` is created atomically: with O_EXCL in a local or NFS folder, with a conditional PUT
(If-None-Match: *) on S3, and with fsspec's create mode on other stores, which is atomic only
where the store provides it (gcsfs and adlfs do). The holder rewrites it every `RENEW_SECONDS`.
Another driver takes it over when it went `STALE_SECONDS` without renewal, at once when its holder
was a process of this machine that no longer runs, or at once when told to (`--force`). Workers
check the run id before every commit, so a unit of a run that lost its lease never lands.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sdbatch.errors import InputError, LeaseLost, first_line

log = logging.getLogger("sdbatch")
LEASE = "_lease.json"
RENEW_SECONDS = 10.0
# Six missed renewals: a driver paused by a slow store or a busy machine keeps its output, one
# that is gone frees it within a minute and a half.
STALE_SECONDS = 60.0


@dataclass(frozen=True)
class Holder:
    """Who holds an output: the run id its workers commit under, and where that driver runs."""

    run_id: str
    host: str
    pid: int
    started: str  # ISO 8601, UTC
    renewed: float  # Unix time of the last renewal, by the holder's clock
    pid_namespace: str = ""  # pids are comparable only within one namespace (one container)

    def describe(self) -> str:
        return f"run {self.run_id} (host {self.host}, pid {self.pid}, since {self.started})"

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, body: bytes) -> Holder:
        return cls(**json.loads(body))


def read_holder(fs: Any, root: str) -> Holder | None:
    """The output's current holder; None when nobody holds it (or the file was never whole)."""
    try:
        return Holder.from_json(fs.cat_file(_path(root)))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError):
        return None  # a lease cut short by a crash holds nothing


def check_holder(fs: Any, root: str, run_id: str) -> None:
    """Raise LeaseLost unless run `run_id` still holds the output (a worker, before it commits)."""
    holder = read_holder(fs, root)
    if holder is None or holder.run_id != run_id:
        now = f"; it is now held by {holder.describe()}" if holder else ""
        raise LeaseLost(f"run {run_id} no longer holds {root}{now}")


@contextmanager
def held(fs: Any, root: str, force: bool = False) -> Iterator[Holder]:
    """Hold the output at `root` for the `with` block, renewing it in the background.

    Raises:
        InputError: another driver holds it (naming the holder and what to do), before any work.
        LeaseLost: on leaving the block, when another driver took it over meanwhile.
    """
    holder = acquire(fs, root, force)
    lost = threading.Event()
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(RENEW_SECONDS):
            try:
                current = read_holder(fs, root)
                if current is None or current.run_id != holder.run_id:
                    lost.set()
                    return
                _write(fs, root, _renewed(holder), exclusive=False)
            except OSError as e:  # a store that is down for a moment: try again next time
                log.warning("could not renew the lease on %s: %s", root, e)

    renewer = threading.Thread(target=renew, name="sdbatch-lease", daemon=True)
    renewer.start()
    try:
        yield holder
    finally:
        stop.set()
        renewer.join()
        current = read_holder(fs, root)
        if current is not None and current.run_id == holder.run_id:
            fs.rm(_path(root))
    if lost.is_set() or current is None or current.run_id != holder.run_id:
        now = current.describe() if current else "nobody"
        raise LeaseLost(f"another driver took {root} over during this run (now held by {now})")


def acquire(fs: Any, root: str, force: bool = False) -> Holder:
    """Take the lease on the output at `root` for this process, without renewing it (`held` does).

    Raises:
        InputError: another driver holds it, or the lease cannot be written.
    """
    try:
        return _take(fs, root, force)
    except OSError as e:
        raise InputError(f"--out: cannot write to {root} ({first_line(e)})") from None


def _take(fs: Any, root: str, force: bool) -> Holder:
    fs.makedirs(root, exist_ok=True)
    mine = Holder(
        run_id=uuid.uuid4().hex[:12],
        host=socket.gethostname(),
        pid=os.getpid(),
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        renewed=time.time(),
        pid_namespace=_pid_namespace(),
    )
    for _ in range(3):  # each round either creates the lease or removes one that is free
        try:
            _write(fs, root, mine, exclusive=True)
            return mine
        except FileExistsError:
            pass
        current = read_holder(fs, root)
        if current is None:
            fs.rm(_path(root))  # never written whole: nobody holds it
            continue
        why = _free(current, force)
        if why is None:
            raise InputError(
                f"--out: {root} is in use by {current.describe()}; wait for it to finish, or pass "
                f"--force to take it over (a lease not renewed for {STALE_SECONDS:.0f} s is taken "
                "over by itself)"
            )
        log.warning("taking over %s from %s: %s", root, current.describe(), why)
        fs.rm(_path(root))
    raise InputError(f"--out: {root} is being taken over by other drivers at this moment")


def _free(holder: Holder, force: bool) -> str | None:
    """Why `holder` may be displaced, or None when it must be left alone."""
    if force:
        return "--force"
    silent = time.time() - holder.renewed
    if silent > STALE_SECONDS:
        return f"not renewed for {silent:.0f} s"
    same_machine = holder.host == socket.gethostname() and holder.pid_namespace == _pid_namespace()
    if same_machine and holder.pid_namespace and not _running(holder.pid):
        return f"process {holder.pid} is gone"
    return None


def _write(fs: Any, root: str, holder: Holder, exclusive: bool) -> None:
    path, body = _path(root), holder.to_json()
    if not exclusive:
        fs.pipe_file(path, body)
    elif "file" in fs.protocol:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(body)
    else:
        fs.pipe_file(path, body, mode="create")


def _renewed(holder: Holder) -> Holder:
    return Holder(**{**asdict(holder), "renewed": time.time()})


def _path(root: str) -> str:
    return f"{root.rstrip('/')}/{LEASE}"


def _pid_namespace() -> str:
    try:
        return str(Path("/proc/self/ns/pid").readlink())
    except OSError:
        return ""  # no /proc: never judge another process from its pid


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
