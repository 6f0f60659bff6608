"""`sdbatch status`, read from outputs made for real: a job polled while its driver runs and after
it ends, a unit that failed every attempt, evaluation's shards, and an output on S3."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import PROMPTS, job
from test_faults import TARGET, raises_while
from test_faults import write_spec as faulty_spec
from test_integrity import driver

from sdbatch.cli import EXIT_INCOMPLETE, EXIT_OK
from sdbatch.cli import main as cli_main
from sdbatch.evaluation.record import METRICS_RECORD
from sdbatch.progress import images_per_second, status

# Two configurations, units of one prompt (2 images, one batch): 12 commits, each slowed down.
TWO_CONFIGS = {"scheduler": ["ddim"], "guidance_scale": [1.0, 7.5]}
ONE_PROMPT_UNITS = {"batch_size": 2, "shard_size": 1, "actors": 1}
BATCH_DELAY = 1.0  # seconds: at most 2 images/s


def test_pace_is_the_images_after_the_windows_first_commit_over_the_time_since():
    commits = [(0.0, 9), (100.0, 4), (110.0, 4), (160.0, 2)]
    # the window (60 s .. 160 s) starts at the commit at 100 s: 6 images in 60 s
    assert images_per_second(commits, end=160.0, window=100.0) == pytest.approx(6 / 60)
    # a job that stopped committing slows down as time goes on
    assert images_per_second(commits, end=200.0, window=100.0) == pytest.approx(6 / 100)
    assert images_per_second(commits, end=300.0, window=100.0) is None
    assert images_per_second(commits[:1], end=0.0) is None


def test_status_follows_a_running_job_then_its_end(tmp_path, ray_address, capsys):
    pq.write_table(pa.table({"prompt": PROMPTS}), tmp_path / "prompts.parquet")
    spec = tmp_path / "job.yaml"
    data = job(tmp_path / "prompts.parquet", sweep=TWO_CONFIGS, runtime=ONE_PROMPT_UNITS)
    spec.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    generating = driver(BATCH_DELAY, "generate", spec, "--out", out, "--address", ray_address)

    # 1. while it runs: three commits give a pace, the holder is the driver, an ETA is given
    deadline = time.time() + 240
    while True:
        assert generating.poll() is None, generating.communicate()
        assert time.time() < deadline, "three units were not committed in time"
        if (out / "run.json").exists() and len(list((out / "_units").glob("*.json"))) >= 3:
            break
        time.sleep(0.2)
    now = status(str(out))
    assert now.running and now.holder.pid == generating.pid
    assert 6 <= now.done < now.total == 24
    assert [c.total for c in now.configs] == [12, 12]
    assert 0 < now.images_per_second <= 2 / BATCH_DELAY * 1.25
    assert now.eta_seconds == pytest.approx((now.total - now.done) / now.images_per_second)
    assert cli_main(["status", str(out), "--json"]) == EXIT_OK
    printed = json.loads(capsys.readouterr().out)
    assert printed["running"] and printed["holder"]["pid"] == generating.pid
    assert printed["done"] >= now.done and printed["total"] == 24
    assert cli_main(["status", str(out)]) == EXIT_OK
    text = capsys.readouterr().out
    assert f"(host {now.holder.host}, pid {generating.pid}, since " in text
    assert "images/s over the last 5 min; ETA " in text

    # 2. after it ends: every image, no holder, no ETA; the last minutes' pace stays readable
    _, err = generating.communicate(timeout=240)
    assert generating.returncode == 0, err
    after = status(str(out))
    assert after.done == after.total == 24 and not after.failed
    assert after.holder is None and not after.running and after.eta_seconds is None
    assert 0 < after.images_per_second <= 2 / BATCH_DELAY * 1.25
    assert cli_main(["status", str(out)]) == EXIT_OK
    text = capsys.readouterr().out
    assert f"{out}: job test, 24 of 24 images (100%) in 2 configurations" in text
    assert "held by" not in text and "ETA" not in text


def test_status_names_a_unit_that_failed_every_attempt(tmp_path, ray_address, monkeypatch, capsys):
    pq.write_table(pa.table({"prompt": PROMPTS}), tmp_path / "prompts.parquet")
    spec = faulty_spec(tmp_path, tmp_path / "prompts.parquet", retries=0)
    flag = tmp_path / "broken"
    flag.touch()
    monkeypatch.setattr("sdbatch.generation.Worker", raises_while(flag))
    out = tmp_path / "out"
    generate = ["generate", str(spec), "--out", str(out), "--address", ray_address]
    assert cli_main(generate) == EXIT_INCOMPLETE

    now = status(str(out))
    assert (now.done, now.total) == (10, 12) and not now.running
    [failed] = now.failed
    assert failed.images == 2 and failed.error == f"ValueError: cannot draw {TARGET!r}"
    capsys.readouterr()
    assert cli_main(["status", str(out)]) == EXIT_OK
    shown = capsys.readouterr().out
    assert f"failed: unit {failed.unit_id} (2 images, 2 attempts): ValueError" in shown

    # once a rerun made its images, the failure is history
    flag.unlink()
    assert cli_main(generate) == EXIT_OK
    assert status(str(out)).failed == ()


def test_status_counts_evaluations_shards(evaluated_output, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(evaluated_output["out"], out)
    done = status(str(out))
    [shards] = done.evaluation
    units = len(list((out / "_units").glob("*.json")))
    assert shards.units_done == shards.units == units and done.metrics_finished

    # an evaluation under way: metrics.json is written last, shards one by one
    (out / METRICS_RECORD).unlink()
    next((out / "metrics" / "_shards" / shards.shard_key).glob("*.npz")).unlink()
    under_way = status(str(out))
    assert under_way.evaluation[0].units_done == units - 1 and under_way.metrics_finished is None


@pytest.mark.slow
def test_status_reads_an_output_on_s3(s3_server, s3_bucket, tmp_path, own_local_ray):
    pq.write_table(pa.table({"prompt": PROMPTS[:3]}), tmp_path / "prompts.parquet")
    spec = tmp_path / "job.yaml"
    data = job(tmp_path / "prompts.parquet", sweep=TWO_CONFIGS, runtime=ONE_PROMPT_UNITS)
    spec.write_text(yaml.safe_dump(data))
    env = {**os.environ, **s3_server, **own_local_ray}
    generated = subprocess.run(
        [sys.executable, "-m", "sdbatch.cli", "generate", str(spec), "--out", "s3://runs/job"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert generated.returncode == 0, generated.stderr

    shown = subprocess.run(
        [sys.executable, "-m", "sdbatch.cli", "status", "s3://runs/job", "--json"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    printed = json.loads(shown.stdout)
    assert printed["output"] == "s3://runs/job" and printed["done"] == printed["total"] == 12
    assert printed["holder"] is None and printed["last_commit"] and printed["failed"] == []
    # it reads the output only: Ray is not even imported
    alone = "import sys, sdbatch; sdbatch.status('s3://runs/job'); print('ray' in sys.modules)"
    imported = subprocess.run(
        [sys.executable, "-c", alone], env=env, capture_output=True, text=True, timeout=60
    )
    assert imported.stdout == "False\n", imported.stderr


def test_status_of_a_location_without_a_run_is_refused(refused, tmp_path):
    assert refused("status", tmp_path) == (
        f"OUT: {tmp_path} holds no sdbatch run (no run.json, no lease)"
    )
