"""Hangs and stops injected for real: a worker that deadlocks mid-unit (and one that is only
slow), the driver's Ray node losing its raylet, SIGINT and SIGTERM sent to a driver process
mid-job, and --address naming a port nobody listens at, one where nothing answers, or a cluster
that wants a token."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import PROMPTS, job
from ray import cloudpickle
from test_faults import KEY, RUNTIME, SMALL, TARGET, rows

from sdbatch import distribute
from sdbatch.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED
from sdbatch.generation import generate
from sdbatch.spec import parse_spec
from sdbatch.worker import Worker

# Ray's actor processes cannot import this test module: ship its classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

# The generate command as its own driver process, each batch slowed so that a signal or a fault
# lands mid-job.
SLOW_GENERATE = """
import sys, time
import sdbatch.generation
from sdbatch.cli import main

class Slow(sdbatch.generation.Worker):
    def _generate(self, unit, prompts, seeds):
        time.sleep(0.4)
        return super()._generate(unit, prompts, seeds)

sdbatch.generation.Worker = Slow
sys.exit(main(sys.argv[1:]))
"""
MANY = [f"{text}, take {take}" for take in range(2) for text in PROMPTS]  # 12 prompts, 6 units


def hangs_once(flag: Path) -> type:
    """A worker that deadlocks at TARGET's batch (the second of its unit), the first time only."""

    class Hangs(Worker):
        def _generate(self, unit, prompts, seeds):
            if any(unit.prompts[p] == TARGET for p in prompts):
                try:
                    flag.touch(exist_ok=False)
                except FileExistsError:
                    pass
                else:
                    threading.Event().wait()  # nothing will ever set it
            return super()._generate(unit, prompts, seeds)

    return Hangs


def test_a_worker_that_hangs_is_replaced_and_its_unit_redone(
    tmp_path, ray_address, monkeypatch, caplog
):
    # The job's batches take well under a second here: a floor of a minute would only slow the
    # test down.
    monkeypatch.setattr(distribute, "STALL_MIN_SECONDS", 5.0)
    flag = tmp_path / "hung"
    monkeypatch.setattr("sdbatch.generation.Worker", hangs_once(flag))
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt": PROMPTS}), prompts)
    spec = parse_spec(job(prompts, sweep=SMALL, runtime=RUNTIME))
    out = tmp_path / "out"

    began = time.monotonic()
    summary = generate(spec, output=str(out), address=ray_address)
    took = time.monotonic() - began

    assert flag.exists(), "the fault was never injected"
    slow = re.search(r"unit (\S+) is slow: no progress for \d+ s", caplog.text)
    assert slow, caplog.text
    unit_id = slow.group(1)
    stalled = caplog.text.index(f"unit {unit_id} made no progress for ")
    assert slow.start() < stalled
    assert f"{unit_id} failed (attempt 1 of 3), will retry: stalled: no progress" in caplog.text
    assert summary.new_images == 12 and not summary.failed
    got = [tuple(r[k] for k in KEY) for r in rows(out)]
    assert len(got) == len(set(got)) == 12
    entry = json.loads((out / "run.json").read_text())["history"][-1]
    assert entry["stalled_units"] == [unit_id] and entry["failed_units"] == []
    assert took < 90, f"the hang held the job for {took:.0f} s"


class SlowAtTarget(Worker):
    """A worker that takes 7 s over TARGET's batch, every time: slow, not stuck."""

    def _generate(self, unit, prompts, seeds):
        if any(unit.prompts[p] == TARGET for p in prompts):
            time.sleep(7)
        return super()._generate(unit, prompts, seeds)


def test_a_unit_slower_than_its_deadline_gets_through_on_a_later_attempt(
    tmp_path, ray_address, monkeypatch, caplog
):
    # A deadline of 5 s, doubled on the unit's second attempt.
    monkeypatch.setattr(distribute, "STALL_MIN_SECONDS", 5.0)
    monkeypatch.setattr(distribute, "STALL_FACTOR", 1)
    monkeypatch.setattr("sdbatch.generation.Worker", SlowAtTarget)
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt": PROMPTS}), prompts)
    spec = parse_spec(job(prompts, sweep=SMALL, runtime=RUNTIME))
    summary = generate(spec, output=str(tmp_path / "out"), address=ray_address)

    assert re.search(r"is given up on at 10 s", caplog.text), caplog.text
    assert summary.new_images == 12 and not summary.failed
    entry = json.loads((tmp_path / "out" / "run.json").read_text())["history"][-1]
    assert len(entry["stalled_units"]) == 1


def write_job(folder: Path, **runtime) -> Path:
    prompts = folder / "prompts.parquet"
    pq.write_table(pa.table({"prompt": MANY}), prompts)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job(prompts, sweep=SMALL, runtime={**RUNTIME, **runtime})))
    return path


def start_driver(spec: Path, out: Path, address: str, **env: str) -> subprocess.Popen:
    args = ["generate", str(spec), "--out", str(out), "--address", address]
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_GENERATE, *args],
        stderr=subprocess.PIPE, text=True, env={**os.environ, **env},
    )  # fmt: skip


def wait_for_units(driver: subprocess.Popen, out: Path | str, count: int, fs=None) -> None:
    """Wait until the driver has committed `count` units (to `fs`, given one)."""
    deadline = time.monotonic() + 240
    while len(committed_units(out, fs)) < count:
        assert driver.poll() is None, driver.communicate()
        assert time.monotonic() < deadline, "no unit was committed in time"
        time.sleep(0.05)


def committed_units(out: Path | str, fs=None) -> list[str]:
    """The done markers of an output in a local folder, or on the fsspec filesystem `fs`."""
    if fs is None:
        return [p.name for p in Path(out, "_units").glob("*.json")]
    fs.invalidate_cache()
    return fs.glob(f"{out}/_units/*.json")


def last_line(stderr: str, only_ours: bool = True) -> str:
    """What the command said last; it printed no traceback and (`only_ours`) nothing but its
    own lines and progress bar."""
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    if only_ours:
        assert all(line.startswith(("sdbatch: ", "generating: ")) for line in lines), stderr
    return lines[-1]


@pytest.mark.parametrize(
    ("sent", "code", "says"),
    [
        (signal.SIGINT, EXIT_INTERRUPTED, "sdbatch: interrupted; "),
        (signal.SIGTERM, EXIT_TERMINATED, "sdbatch: terminated (SIGTERM); "),
    ],
    ids=["SIGINT", "SIGTERM"],
)
def test_a_signal_stops_the_driver_and_a_rerun_completes_the_job(
    sent, code, says, tmp_path, ray_address, caplog
):
    spec, out = write_job(tmp_path, actors=1), tmp_path / "out"

    # 1. a real signal to a real driver mid-job: its exit status and one line, nothing more
    driver = start_driver(spec, out, ray_address)
    wait_for_units(driver, out, 2)
    driver.send_signal(sent)
    _, stderr = driver.communicate(timeout=60)
    assert driver.returncode == code, stderr
    assert last_line(stderr).startswith(says), stderr
    kept = {p.name for p in (out / "_units").glob("*.json")}
    assert 2 <= len(kept) < 6

    # 2. the rerun keeps the finished units and writes each image exactly once
    caplog.set_level(logging.INFO, logger="sdbatch")
    summary = generate(parse_spec(yaml.safe_load(spec.read_text())), output=str(out))
    assert f"resuming: {4 * len(kept)} images done" in caplog.text
    assert summary.new_images == 24 - 4 * len(kept) and not summary.failed
    got = [tuple(r[k] for k in KEY) for r in rows(out)]
    assert len(got) == len(set(got)) == 24
    assert not list((out / "_tmp").iterdir())


class SlowWorker(Worker):
    def _generate(self, unit, prompts, seeds):
        time.sleep(0.4)
        return super()._generate(unit, prompts, seeds)


def test_a_stop_request_whose_interrupt_was_lost_still_stops_the_run(
    tmp_path, ray_address, monkeypatch
):
    """A signal handler's KeyboardInterrupt can be dropped (raised while a finalizer runs); the
    flag it sets stops the run all the same, within a second."""
    from sdbatch.errors import STOP_REQUESTED

    monkeypatch.setattr("sdbatch.generation.Worker", SlowWorker)
    spec, out = write_job(tmp_path, actors=1), tmp_path / "out"

    def request_stop() -> None:
        while len(committed_units(out)) < 2:
            time.sleep(0.05)
        STOP_REQUESTED.set()  # what the handler does, without its exception

    threading.Thread(target=request_stop, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            generate(parse_spec(yaml.safe_load(spec.read_text())), output=str(out),
                     address=ray_address)  # fmt: skip
    finally:
        STOP_REQUESTED.clear()
    assert 2 <= len(committed_units(out)) < 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """Start a separate Ray head node on loopback (`ray start`); returns a function
    (dashboard port, env overrides) -> (its address, its temp dir): with a port, the dashboard
    and its job server listen there, on 127.0.0.1. Its processes are killed afterwards."""
    # Short: Ray's unix socket paths under it must stay within 107 characters.
    temp = tempfile.mkdtemp(prefix="sdb-ray-", dir="/tmp")

    def start(dashboard_port: int | None = None, **env: str) -> tuple[str, str]:
        port = free_port()
        ray = Path(sys.executable).with_name("ray")
        dashboard = ["--include-dashboard=false"]
        if dashboard_port:
            # The head's agent serves the job server; its default port may be taken.
            dashboard = ["--include-dashboard=true", "--dashboard-host=127.0.0.1",
                         f"--dashboard-port={dashboard_port}",
                         f"--dashboard-agent-listen-port={free_port()}"]  # fmt: skip
        subprocess.run(
            [str(ray), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
             f"--temp-dir={temp}", "--num-cpus=1", *dashboard, "--disable-usage-stats"],
            env={**os.environ, **env}, check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        return f"127.0.0.1:{port}", temp

    yield start
    for process in ray_processes(temp):
        process.kill()
    shutil.rmtree(temp, ignore_errors=True)


def ray_processes(temp: str) -> list[psutil.Process]:
    """The processes of the Ray instance whose temp dir is `temp`."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(temp in part for part in process.info["cmdline"] or ()):
            found.append(process)
    return found


@pytest.mark.slow
def test_the_driver_stops_when_its_ray_node_dies(tmp_path, ray_head, ray_address):
    # ray.init turned token authentication on in this process's environment, for the test
    # session's instance (a token is on file); this one goes without, on both sides.
    address, temp = ray_head(RAY_AUTH_MODE="disabled")
    spec, out = write_job(tmp_path, actors=1), tmp_path / "out"
    driver = start_driver(spec, out, address, RAY_AUTH_MODE="disabled")
    wait_for_units(driver, out, 1)
    (raylet,) = [p for p in ray_processes(temp) if p.name() == "raylet"]
    raylet.kill()
    killed = time.monotonic()
    _, stderr = driver.communicate(timeout=120)
    took = time.monotonic() - killed

    assert driver.returncode == EXIT_FAILED, stderr
    assert "sdbatch: failed: no live Ray node can take a worker (1 CPU)" in stderr
    # Ray may forward its own lines about the dead raylet
    assert last_line(stderr, only_ours=False).startswith("sdbatch: finished units are kept")
    assert took < 45, f"stopped {took:.0f} s after the raylet died"
    # the finished units stay, and a rerun elsewhere completes the job
    kept = len(list((out / "_units").glob("*.json")))
    summary = generate(parse_spec(yaml.safe_load(spec.read_text())), output=str(out))
    assert summary.new_images == 24 - 4 * kept
    got = [tuple(r[k] for k in KEY) for r in rows(out)]
    assert len(got) == len(set(got)) == 24


def run_cli(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    """The sdbatch command in its own process (this one already holds a Ray session)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "sdbatch.cli", *args],
        capture_output=True, text=True, timeout=120, env={**env, "RAY_AUTH_MODE": "disabled"},
    )  # fmt: skip
    return done, time.monotonic() - began


def test_an_address_nobody_listens_at_fails_in_one_line(tmp_path):
    spec = write_job(tmp_path)
    port = free_port()
    done, took = run_cli("generate", str(spec), "--out", str(tmp_path / "out"),
                         "--address", f"127.0.0.1:{port}")  # fmt: skip
    assert done.returncode == EXIT_BAD_INPUT, done.stderr
    assert last_line(done.stderr) == (
        f"sdbatch: error: --address: no Ray cluster at 127.0.0.1:{port} "
        f"([Errno {errno.ECONNREFUSED}] {os.strerror(errno.ECONNREFUSED)})"
    )
    assert not (tmp_path / "out" / "run.json").exists()
    assert took < 30  # the process's imports included; Ray alone would retry for minutes


def test_an_address_where_no_ray_answers_fails_within_seconds(tmp_path):
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()  # the kernel accepts; nothing ever answers
        address = f"127.0.0.1:{listening.getsockname()[1]}"
        done, took = run_cli("generate", str(write_job(tmp_path)), "--out", str(tmp_path / "out"),
                             "--address", address)  # fmt: skip
    assert done.returncode == EXIT_BAD_INPUT, done.stderr
    assert last_line(done.stderr) == (
        f"sdbatch: error: --address: {address} does not answer as a Ray cluster within "
        f"{distribute.CONNECT_SECONDS} s"
    )
    assert took < 30


def test_a_cluster_that_wants_a_token_fails_in_one_line(tmp_path, ray_head):
    address, _ = ray_head(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0123456789abcdef" * 2)
    done, took = run_cli("generate", str(write_job(tmp_path)), "--out", str(tmp_path / "out"),
                         "--address", address)  # fmt: skip
    assert done.returncode == EXIT_BAD_INPUT, done.stderr
    assert last_line(done.stderr) == (
        f"sdbatch: error: --address: the Ray cluster at {address} requires its authentication "
        "token; set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to it"
    )
    assert took < 30
