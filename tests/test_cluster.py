"""Ray clusters as users run them, on 127.0.0.1: a job submitted through the real Ray Jobs API to
a `ray start` head (its dashboard on loopback) and followed to SUCCEEDED, as the KubeRay
manifest's entrypoint would be; a submitted job stopped and submitted again; a two-node cluster
that loses its second node (raylet and workers killed) mid-generation and mid-evaluation; and
progress as plain lines when stderr is not a terminal. Outputs are on a real S3-compatible server
(moto)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import psutil
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO, job, suite_data
from ray import cloudpickle
from test_faults import KEY, SLOW_EVAL
from test_hangs import (
    MANY,
    SLOW_GENERATE,
    committed_units,
    free_port,
    ray_head,  # noqa: F401 (a fixture)
    ray_processes,
    start_driver,
    wait_for_units,
    write_job,
)

from sdbatch import distribute
from sdbatch.cli import EXIT_OK
from sdbatch.generation import generate
from sdbatch.spec import load_spec, parse_spec
from sdbatch.toy.world import write_reference
from sdbatch.worker import Worker

# Ray's actor processes cannot import this test module: ship its classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])
CLUSTER = REPO / "jobs" / "cluster"
MANIFEST = CLUSTER / "kuberay-rayjob.yaml"
RUNTIME_ENV = CLUSTER / "runtime-env.yaml"
# Files beside the specs (4 MiB each) that the runtime env's excludes keep out of the upload.
CLUTTER = (".venv/lib/big.bin", "out/demo/images/part.parquet", ".git/objects/pack.pack")
# Ray declares a node dead after this many missed health checks of this period (default 5 x 3 s).
HEALTH_CHECKS = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


def manifest_entrypoint(spec: str, out: str) -> str:
    """The KubeRay manifest's entrypoint with its spec and --out replaced: what the tests run."""
    argv = shlex.split(yaml.safe_load(MANIFEST.read_text())["spec"]["entrypoint"])
    argv[2], argv[argv.index("--out") + 1] = spec, out
    return shlex.join(argv)


def test_the_kuberay_manifest_submits_a_gpu_sweep_with_the_documented_runtime_env():
    manifest = yaml.safe_load(MANIFEST.read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    spec = manifest["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    (gpu,) = cluster["workerGroupSpecs"]
    (container,) = gpu["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    # the runtime env is jobs/cluster/runtime-env.yaml's, plus where the working dir comes from
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env.pop("working_dir").endswith(".zip")
    assert runtime_env == yaml.safe_load(RUNTIME_ENV.read_text())
    # the entrypoint is the command test_a_job_submitted_to_the_ray_jobs_api_... runs, on a spec
    # this checkout ships
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["sdbatch", "run"] and argv[3] == "--out"
    assert argv[4].startswith("s3://") and load_spec(REPO / argv[2]).name == "sd15_parti"


class SlowBatches(Worker):
    """A worker whose batches take at least 0.3 s."""

    def _generate(self, unit, prompts, seeds):
        time.sleep(0.3)
        return super()._generate(unit, prompts, seeds)


def test_progress_without_a_terminal_is_plain_lines_with_rate_and_eta(
    tmp_path, ray_address, monkeypatch, capfd, caplog
):
    # A line every half second instead of every 30, and batches slow enough to see a few.
    monkeypatch.setattr(distribute, "LOG_PROGRESS_SECONDS", 0.5)
    monkeypatch.setattr("sdbatch.generation.Worker", SlowBatches)
    caplog.set_level(logging.INFO, logger="sdbatch")
    spec = parse_spec(yaml.safe_load(write_job(tmp_path, actors=1, batch_size=4).read_text()))
    generate(spec, output=str(tmp_path / "out"), address=ray_address)

    assert "\r" not in capfd.readouterr().err  # no bar drawn on the captured stderr
    lines = [m for m in caplog.messages if m.startswith("generating: ")]
    assert lines[0] == "generating: 0/24 images (0%)", lines
    periodic = r"generating: \d+/24 images \(\d+%\), [\d.]+ images/s, ETA \d\d:\d\d"
    assert any(re.fullmatch(periodic, m) for m in lines), lines
    assert re.fullmatch(
        r"generating: 24/24 images \(100%\), [\d.]+ images/s, \d\d:\d\d elapsed", lines[-1]
    ), lines


def working_dir(root: Path) -> Path:
    """A folder as a user submits it: jobs/x.yaml, its prompts, its suite and reference images,
    and clutter (a virtual environment, old outputs, git objects) that must not be uploaded."""
    work = root / "work"
    (work / "jobs").mkdir(parents=True)
    pq.write_table(pa.table({"prompt": MANY}), work / "jobs" / "x-prompts.parquet")
    write_reference(str(work / "jobs" / "x-reference.parquet"), count=24, size=32)
    suite = suite_data(
        Path("x-reference.parquet"), "s3://runs/reference-cache", runtime={"actors": 1}
    )
    (work / "jobs" / "x-suite.yaml").write_text(yaml.safe_dump(suite))
    spec = job(
        Path("x-prompts.parquet"),
        name="x",
        suite="x-suite.yaml",
        sweep={"scheduler": ["ddim"], "guidance_scale": [7.5]},
        runtime={"batch_size": 2, "shard_size": 2, "actors": 1},
    )
    (work / "jobs" / "x.yaml").write_text(yaml.safe_dump(spec))
    (work / "slow_generate.py").write_text(SLOW_GENERATE)
    for path in CLUTTER:
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        (work / path).write_bytes(b"\0" * (4 << 20))
    return work


@pytest.fixture
def jobs_api(ray_head, s3_server, tmp_path):  # noqa: F811 (test_hangs's fixture)
    """A Ray head on 127.0.0.1 with its dashboard (the Jobs API) on loopback, whose node holds
    the storage credentials; returns a client of the Jobs API, the documented runtime env with a
    user's working dir, the bucket and the head's temp dir."""
    from ray._private.utils import get_dashboard_dependency_error
    from ray.job_submission import JobSubmissionClient

    if missing := get_dashboard_dependency_error():
        pytest.fail(f"the Ray dashboard needs ray[default] (pip install -e '.[dev]'): {missing}")
    port = free_port()
    credentials = {k: v for k, v in s3_server.items() if k.startswith("AWS_")}
    # `sdbatch` is found on the PATH of the Python that runs the tests, installed or not.
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    _, temp = ray_head(dashboard_port=port, RAY_AUTH_MODE="disabled", PATH=path, **credentials)
    bucket = fsspec.filesystem(
        "s3", endpoint_url=s3_server["FSSPEC_S3_ENDPOINT_URL"], key="test", secret="test"
    )
    bucket.mkdir("runs")
    runtime_env = yaml.safe_load(RUNTIME_ENV.read_text())
    # The cluster's Python has sdbatch installed (this checkout): no per-job virtualenv.
    del runtime_env["pip"]
    runtime_env["working_dir"] = str(working_dir(tmp_path))
    # The server's address is no secret: it travels in the runtime env, as the file suggests.
    runtime_env["env_vars"]["FSSPEC_S3_ENDPOINT_URL"] = s3_server["FSSPEC_S3_ENDPOINT_URL"]
    client = JobSubmissionClient(f"http://127.0.0.1:{port}")
    return client, runtime_env, bucket, temp


def submit(client, entrypoint: str, runtime_env: dict) -> str:
    """Submit a job; returns its id. For its first seconds a new head's Jobs API answers that
    no agent can take a job yet: a user would retry, and so does this."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(1)


def follow(client, job_id: str, timeout: float = 300) -> str:
    """Wait for a submitted job to end; returns its status."""
    deadline = time.monotonic() + timeout
    while not (status := client.get_job_status(job_id)).is_terminal():
        assert time.monotonic() < deadline, client.get_job_logs(job_id)
        time.sleep(0.5)
    return status


def keys(bucket, out: str) -> list[tuple]:
    bucket.invalidate_cache()
    table = pads.dataset(f"{out}/images", filesystem=bucket).to_table(columns=KEY)
    return [tuple(row.values()) for row in table.to_pylist()]


@pytest.mark.slow
def test_a_job_submitted_to_the_ray_jobs_api_runs_the_sweep_and_logs_plain_progress(jobs_api):
    client, runtime_env, bucket, temp = jobs_api
    entrypoint = manifest_entrypoint("jobs/x.yaml", "s3://runs/x")
    job_id = submit(client, entrypoint, runtime_env)

    assert follow(client, job_id) == "SUCCEEDED", client.get_job_logs(job_id)
    logs = client.get_job_logs(job_id)
    # what `ray job logs -f` shows: lines, no progress bar redrawn with carriage returns
    assert "\r" not in logs, logs
    assert "sdbatch: generating: 24/24 images (100%), " in logs
    assert "sdbatch: evaluating: " in logs and "images/s, " in logs
    assert "s3://runs/x/report/index.html" in logs
    # every image once, evaluated and reported, on the bucket
    got = keys(bucket, "runs/x")
    assert len(got) == len(set(got)) == 24
    assert json.loads(bucket.cat("runs/x/metrics/metrics.json"))
    assert bucket.exists("runs/x/report/index.html")
    # the working dir travelled without its clutter
    (uploaded,) = Path(temp, "session_latest").glob("runtime_resources/working_dir_files/*/")
    assert (uploaded / "jobs" / "x.yaml").is_file()
    assert not [p for p in CLUTTER if (uploaded / p.split("/")[0]).exists()]


@pytest.mark.slow
def test_a_stopped_job_resumes_when_submitted_again(jobs_api):
    client, runtime_env, bucket, _ = jobs_api
    out = "s3://runs/stopped"

    # 1. `ray job stop` (stop_job) once a unit is committed: sdbatch stops like on SIGTERM
    slow = submit(client, f"python slow_generate.py generate jobs/x.yaml --out {out}", runtime_env)
    deadline = time.monotonic() + 240
    while not committed_units("runs/stopped", bucket):
        assert client.get_job_status(slow) in ("PENDING", "RUNNING"), client.get_job_logs(slow)
        assert time.monotonic() < deadline, client.get_job_logs(slow)
        time.sleep(0.2)
    assert client.stop_job(slow)
    assert follow(client, slow) == "STOPPED"
    assert "sdbatch: terminated (SIGTERM); rerun the same command to resume" in (
        client.get_job_logs(slow)
    )
    kept = len(committed_units("runs/stopped", bucket))
    assert 1 <= kept < 6

    # 2. the same job submitted again makes the rest, every image exactly once
    again = submit(client, f"sdbatch generate jobs/x.yaml --out {out}", runtime_env)
    assert follow(client, again) == "SUCCEEDED", client.get_job_logs(again)
    assert f"resuming: {4 * kept} images done" in client.get_job_logs(again)
    got = keys(bucket, "runs/stopped")
    assert len(got) == len(set(got)) == 24


@pytest.fixture
def two_nodes(s3_bucket, monkeypatch):
    """A Ray cluster of two nodes on 127.0.0.1 (`ray.cluster_utils.Cluster`: a head and a
    second raylet joining it), 1 CPU each; their processes hold the S3 server's environment."""
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    # Short: Ray's unix socket paths under it must stay within 107 characters.
    temp = tempfile.mkdtemp(prefix="sdb-ray-", dir="/tmp")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "temp_dir": temp,
            "include_dashboard": False,
            "_system_config": HEALTH_CHECKS,
        },
    )
    cluster.add_node(num_cpus=1)
    yield cluster
    cluster.shutdown()
    for process in ray_processes(temp):
        process.kill()
    shutil.rmtree(temp, ignore_errors=True)


def kill_node_mid_unit(node, driver: subprocess.Popen) -> None:
    """SIGKILL `node`'s raylet and its workers, as when the machine is lost, while a worker actor
    of that node runs a unit (Ray titles its process `ray::CLASS.run` then). A worker whose raylet
    alone died may still finish its unit and hand it back directly to the driver, so that under
    load the loss would fall between units, not inside one."""
    from ray._private.ray_constants import PROCESS_TYPE_RAYLET

    raylet = psutil.Process(node.all_processes[PROCESS_TYPE_RAYLET][0].process.pid)
    deadline = time.monotonic() + 240
    while True:
        titles = []
        for process in raylet.children(recursive=True):
            try:
                titles.append(" ".join(process.cmdline()))
            except psutil.Error:
                continue
        if any(t.startswith("ray::") and t.split()[0].endswith(".run") for t in titles):
            break
        assert driver.poll() is None, driver.communicate()
        assert time.monotonic() < deadline, f"no unit ran on the second node: {titles}"
        time.sleep(0.02)
    for process in [raylet, *raylet.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            process.kill()


@pytest.mark.slow
def test_a_node_lost_mid_generation_and_mid_evaluation(two_nodes, s3_bucket, tmp_path):
    cluster, bucket = two_nodes, s3_bucket
    spec, out = write_job(tmp_path), "s3://runs/job"  # 6 units, 2 CPU actors: one per node

    # 1. generate; the second node's raylet is killed while its actor runs a unit
    driver = start_driver(spec, out, cluster.address)
    wait_for_units(driver, "runs/job", 1, bucket)
    (second,) = cluster.worker_nodes
    kill_node_mid_unit(second, driver)
    _, stderr = driver.communicate(timeout=240)
    assert driver.returncode == EXIT_OK, stderr
    assert "a worker died during unit " in stderr
    got = keys(bucket, "runs/job")
    assert len(got) == len(set(got)) == 24

    # 2. evaluate on a new second node, which is lost the same way
    node = cluster.add_node(num_cpus=1)
    write_reference(str(tmp_path / "reference.parquet"), count=24, size=32)
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump(suite_data(tmp_path / "reference.parquet", tmp_path / "c")))
    args = ["eval", out, "--suite", str(suite), "--address", cluster.address]
    driver = subprocess.Popen(
        [sys.executable, "-c", SLOW_EVAL, *args], stderr=subprocess.PIPE, text=True
    )
    kill_node_mid_unit(node, driver)
    _, stderr = driver.communicate(timeout=240)
    assert driver.returncode == EXIT_OK, stderr
    assert "a worker died during unit " in stderr
    bucket.invalidate_cache()
    with bucket.open("runs/job/metrics/images.parquet", "rb") as f:
        scored = [tuple(r.values()) for r in pq.read_table(f, columns=KEY).to_pylist()]
    assert sorted(scored) == sorted(got)
    with bucket.open("runs/job/metrics/configs.parquet", "rb") as f:
        assert pq.read_table(f).column("n_images").to_pylist() == [24]
