"""Shared fixtures: a real local Ray instance on loopback, prompt files and spec files."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

# Ray binds its services to the machine's address unless told this is a single-node setup;
# tests keep everything on 127.0.0.1.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]
PARTI = REPO.parent / "shared" / "data" / "PartiPrompts.tsv"
PROMPTS = [
    "a red circle on a white background",
    "a lighthouse on a cliff at sunset",
    "a bowl of ramen, studio photo",
    "an astronaut riding a horse",
    "a cat in a wizard hat, watercolor",
    "a city street at night, neon",
]


@pytest.fixture
def parti():
    """The real PartiPrompts TSV from ../shared/data beside the checkout."""
    if not PARTI.is_file():
        pytest.skip(f"{PARTI} not found (the shared data folder sits beside the checkout)")
    return PARTI


@pytest.fixture(scope="session")
def ray_address():
    """One real Ray instance for the whole session (2 CPUs, loopback); yields its address. A new
    one always ("local"): never a cluster some other process left running on this machine."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu run only where CUDA is (bench/gpu_check.sh runs them on a lent GPU)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (bench/gpu_check.sh runs it on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def prompt_file(tmp_path):
    """Write a Parquet prompt file; returns a function (texts, **extra columns) -> path."""

    def write(texts=PROMPTS, name="prompts.parquet", **columns):
        path = tmp_path / name
        pq.write_table(pa.table({"prompt": list(texts), **columns}), path)
        return path

    return write


def job(prompts_path: Path, /, **overrides) -> dict:
    """A small, fast job spec as plain data; `overrides` replace top-level sections or fields."""
    spec = {
        "name": "test",
        "model": "builtin:tiny",
        "prompts": {"path": str(prompts_path)},
        "sweep": {
            "scheduler": ["ddim", "euler_a"],
            "num_inference_steps": [2],
            "guidance_scale": [1.0, 7.5],
            "images_per_prompt": 2,
            "height": 32,
            "width": 32,
        },
        "seed": 7,
        "runtime": {"batch_size": 4, "shard_size": 2},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


@pytest.fixture
def spec_file(tmp_path):
    """Write a spec dict as YAML; returns a function (dict, name) -> path."""

    def write(data: dict, name: str = "job.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data))
        return path

    return write


@pytest.fixture
def refused(monkeypatch, capsys):
    """Run the CLI on bad input; returns its error text after checking the promise made for
    every bad input: exit 2, one short line, in well under 5 s and 200 MB, and Ray never
    started (starting it fails the command with a traceback and exit 1)."""
    from importlib import import_module

    from sdbatch import distribute
    from sdbatch.cli import main

    def ray_started(address):
        raise AssertionError("bad input reached distribute.session: Ray was started")

    monkeypatch.setattr(distribute, "session", ray_started)
    # imported up front, so that their time and memory are not counted against the input
    for module in ("sdbatch.generation", "sdbatch.evaluation.run"):
        import_module(module)

    def run(*argv) -> str:
        capsys.readouterr()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        began = time.perf_counter()
        code = main([str(a) for a in argv])
        seconds = time.perf_counter() - began
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak
        err = capsys.readouterr().err
        assert code == 2, err
        assert err.startswith("sdbatch: error: ") and err.count("\n") == 1, err
        assert len(err) < 300, err
        assert seconds < 5, f"{seconds:.1f} s: {err}"
        assert grown < 200_000, f"peak memory grew {grown / 1024:.0f} MiB: {err}"
        return err.removeprefix("sdbatch: error: ").rstrip("\n")

    return run


LONG_PROMPT = "a very detailed painting of " + "a tall tree, " * 10  # > 77 byte tokens


def suite_data(images: Path, cache: Path, **overrides) -> dict:
    """A small evaluation suite as plain data, on the builtin CLIP, against `images`."""
    data = {
        "name": "test",
        "clip": {"model": "builtin:tiny-clip"},
        "fid": {"features": "clip"},
        "kid": {"subsets": 5, "subset_size": 10},
        "reference": {"images": str(images)},
        "bootstrap": {"samples": 20},
        "cache": str(cache),
        "runtime": {"actors": 2, "batch_size": 8},
    }
    data.update(overrides)
    return data


@pytest.fixture(scope="session")
def evaluated_output(tmp_path_factory, ray_address):
    """A generated output (4 configurations, one prompt over CLIP's context), a reference set
    of rendered shapes, and the output evaluated once. Tests that change it work on a copy."""
    from sdbatch.evaluation.run import evaluate
    from sdbatch.evaluation.suite import parse_suite
    from sdbatch.generation import generate
    from sdbatch.spec import parse_spec
    from sdbatch.toy.world import write_reference

    root = tmp_path_factory.mktemp("evaluated")
    prompts = root / "prompts.parquet"
    pq.write_table(pa.table({"prompt": [*PROMPTS, LONG_PROMPT]}), prompts)
    out = root / "out"
    generate(parse_spec(job(prompts)), output=str(out), address=ray_address)
    reference = root / "reference.parquet"
    write_reference(str(reference), count=40, size=32)
    suite = parse_suite(suite_data(reference, root / "cache"))
    summary = evaluate(str(out), suite, address=ray_address)
    return {"root": root, "out": out, "reference": reference, "suite": suite, "summary": summary}


@pytest.fixture
def s3_server():
    """A real S3-compatible server (moto) on 127.0.0.1; yields the environment that reaches it."""
    pytest.importorskip("s3fs")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "moto_server"),
            "-H",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        # fsspec passes FSSPEC_<PROTOCOL>_<ARG> to the filesystem: here s3fs's endpoint_url.
        "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    deadline = time.time() + 30
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert time.time() < deadline and server.poll() is None, "moto did not start"
        time.sleep(0.2)
    yield S3Server(env, process=server)
    server.terminate()
    server.wait()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """The S3 server's filesystem, reached from this process too, with an empty bucket `runs`."""
    import fsspec

    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    fs = fsspec.filesystem("s3", endpoint_url=s3_server["FSSPEC_S3_ENDPOINT_URL"])
    fs.mkdir("runs")
    return fs


class S3Server(dict):
    """The environment that reaches a test's S3 server; `process` is the server itself."""

    def __init__(self, env: dict, process: subprocess.Popen):
        super().__init__(env)
        self.process = process


@pytest.fixture
def own_local_ray():
    """The environment in which a CLI subprocess starts a Ray instance of its own: without an
    address Ray would join the one `ray start` last started on this machine (found in its
    temporary folder), so it gets a temporary folder of its own, short for Ray's socket paths."""
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="sdb-", dir="/tmp")
    yield {"RAY_ADDRESS": "", "RAY_TMPDIR": folder}
    shutil.rmtree(folder, ignore_errors=True)
