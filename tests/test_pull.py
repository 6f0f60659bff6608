"""`sdbatch pull`: a spec's model and its suite's CLIP, pinned on the driver, found or fetched into
the Hugging Face cache of every node: of a local Ray instance, and of a real two-node cluster.
Nothing can be downloaded here: the hub is a cache laid out as huggingface_hub writes it, used
offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import job

from sdbatch.builtin import builtin_path

COMMIT = "0123456789abcdef0123456789abcdef01234567"
MODEL, CLIP = "sdbatch/tiny-test", "sdbatch/tiny-clip-test"

# A cluster of two nodes on this machine, the second with its own environment, joined by the
# driver that pulls (`sdbatch.pull` in a session already connected uses its cluster).
TWO_NODES = """
import json, sys
import ray
from ray.cluster_utils import Cluster
import sdbatch

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
second = cluster.add_node(num_cpus=1, env_vars=json.loads(sys.argv[2]))
ray.init(address=cluster.address, logging_level="ERROR")
try:
    found = {"pulled": sdbatch.pull(sdbatch.load_spec(sys.argv[1]))}
except sdbatch.JobFailed as e:
    found = {"failed": str(e)}
try:
    print(json.dumps({"second": second.node_id[:8], **found}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def cache_repo(hub: Path, repo: str, builtin: str) -> Path:
    """A hub repo's snapshot at COMMIT, as huggingface_hub caches it; returns the snapshot."""
    folder = hub / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / COMMIT
    shutil.copytree(builtin_path(builtin), snapshot)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def hub_spec(tmp_path, prompt_file, spec_file):
    """A spec naming a hub pipeline and a suite with a hub CLIP, both in an offline cache."""
    hub = tmp_path / "hub"
    snapshots = {MODEL: cache_repo(hub, MODEL, "tiny"), CLIP: cache_repo(hub, CLIP, "tiny-clip")}
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        yaml.safe_dump({"name": "t", "metrics": ["clip_score"], "clip": {"model": CLIP}})
    )
    spec = spec_file(job(prompt_file(), model=MODEL, suite=str(suite)))
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    return spec, env, snapshots


@pytest.mark.slow
def test_pull_on_a_local_instance_finds_every_model_at_its_pinned_commit(hub_spec, own_local_ray):
    spec, env, snapshots = hub_spec
    pulled = subprocess.run(
        [sys.executable, "-m", "sdbatch.cli", "pull", str(spec)],
        env={**os.environ, **own_local_ray, **env}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert pulled.returncode == 0, pulled.stderr
    lines = pulled.stdout.splitlines()
    node = lines[0].split(": ")[0]  # the local Ray instance's one node
    assert lines == [
        f"{node}: {MODEL} -> {snapshots[MODEL]}",
        f"{node}: {CLIP} -> {snapshots[CLIP]}",
    ]


@pytest.mark.slow
def test_pull_runs_on_every_node_and_names_the_node_that_lacks_a_model(hub_spec, tmp_path):
    spec, env, snapshots = hub_spec
    base = {**os.environ, **env, "RAY_ADDRESS": ""}

    # 1. both nodes reach the cache: each reports where every model is
    same = subprocess.run(
        [sys.executable, "-c", TWO_NODES, str(spec), "{}"],
        env=base, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert same.returncode == 0, same.stderr
    nodes = json.loads(same.stdout.splitlines()[-1])["pulled"]
    assert len(nodes) == 2, nodes
    for models in nodes.values():
        assert models == {ref: str(path) for ref, path in snapshots.items()}

    # 2. the second node has a cache of its own, empty, and is offline: the pull fails there
    empty = tmp_path / "empty-hub"
    empty.mkdir()
    second = json.dumps({"HF_HUB_CACHE": str(empty)})
    lacking = subprocess.run(
        [sys.executable, "-c", TWO_NODES, str(spec), second],
        env=base, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert lacking.returncode == 0, lacking.stderr
    found = json.loads(lacking.stdout.splitlines()[-1])
    assert f"(node {found['second']}): " in found["failed"], found
    assert f"cannot fetch {MODEL}@{COMMIT}" in found["failed"]
