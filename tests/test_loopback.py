"""A local run is not a network service: the Ray instance `sdbatch generate` starts for one
machine listens on loopback only, and says nothing about its authentication token."""

from __future__ import annotations

import ipaddress
import time

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import PROMPTS, job
from test_integrity import driver

from sdbatch.distribute import LOCAL_ONLY_ENV


def loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def bound_sockets(root: psutil.Process) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every TCP socket listening and every UDP socket bound in
    `root` and the processes below it (Ray's GCS, raylet, agents and workers)."""
    found = set()
    for process in [root, *root.children(recursive=True)]:
        try:
            for sock in process.net_connections(kind="inet"):
                if sock.status in (psutil.CONN_LISTEN, psutil.CONN_NONE) and sock.laddr:
                    found.add((process.name(), sock.laddr.ip, sock.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue  # a worker that ended meanwhile
    return found


@pytest.mark.slow
def test_a_local_run_listens_on_loopback_only_and_prints_no_token_banner(tmp_path, own_local_ray):
    pq.write_table(pa.table({"prompt": PROMPTS}), tmp_path / "prompts.parquet")
    one_config = {"scheduler": ["ddim"], "guidance_scale": [7.5]}
    data = job(tmp_path / "prompts.parquet", sweep=one_config, runtime={"batch_size": 2})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    # Ray's default on Linux (the tests' own Ray is told to stay on loopback in conftest)
    env = {**own_local_ray, LOCAL_ONLY_ENV: "1"}
    generating = driver(1.0, "generate", tmp_path / "job.yaml", "--out", out, env=env)
    try:
        # 1. mid-run, with the workers loaded and committing: every socket of every Ray process
        deadline = time.time() + 240
        while not (out / "_units").is_dir() or not any((out / "_units").glob("*.json")):
            assert generating.poll() is None, generating.communicate()
            assert time.time() < deadline, "no unit was committed in time"
            time.sleep(0.2)
        sockets = bound_sockets(psutil.Process(generating.pid))
        names = {name for name, _, _ in sockets}
        assert {"gcs_server", "raylet"} <= names, sockets
        assert any(name.startswith("ray::") for name in names), sockets  # a worker's server
        assert [s for s in sockets if not loopback(s[1])] == []

        # 2. the run ends well, and its stderr never mentions Ray's token
        _, err = generating.communicate(timeout=300)
    finally:
        generating.kill()
    assert generating.returncode == 0, err
    assert "token" not in err.lower() and "RAY_AUTH" not in err, err
