"""Integrity under real faults: two drivers on one output (on disk and on S3), a forced takeover
racing a running job, files damaged behind their markers, and a full disk (a real tmpfs)."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import PROMPTS, job

from sdbatch.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INCOMPLETE, EXIT_OK
from sdbatch.cli import main as cli_main
from sdbatch.errors import InputError
from sdbatch.evaluation.run import evaluate
from sdbatch.generation import generate
from sdbatch.lease import LEASE, STALE_SECONDS, Holder
from sdbatch.output import Output
from sdbatch.spec import load_spec

KEY = ["prompt_id", "sample_index", "config_id"]
# One configuration, 6 prompts x 2 images in units of 2 prompts: 3 units of 4 images.
SMALL = {"scheduler": ["ddim"], "guidance_scale": [7.5]}
RUNTIME = {"batch_size": 2, "shard_size": 2, "actors": 1}

# The real CLI as its own driver process, each batch slowed down by DELAY seconds (written into
# the class, which Ray ships to its actors), so that a second driver or a fault lands while it runs.
SLOW_DRIVER = """
import sys, time
import sdbatch.generation
from sdbatch.cli import main

class Slow(sdbatch.generation.Worker):
    def _generate(self, unit, prompts, seeds):
        time.sleep(DELAY)
        return super()._generate(unit, prompts, seeds)

sdbatch.generation.Worker = Slow
sys.exit(main(sys.argv[1:]))
"""


def driver(delay: float, *args, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_DRIVER.replace("DELAY", repr(delay)), *map(str, args)],
        env={**os.environ, **(env or {})},
        stderr=subprocess.PIPE,
        text=True,
    )


def write_spec(folder: Path, name: str = "job.yaml", **overrides) -> Path:
    prompts = folder / "prompts.parquet"
    if not prompts.exists():
        pq.write_table(pa.table({"prompt": PROMPTS}), prompts)
    path = folder / name
    data = job(prompts, sweep=SMALL, runtime=RUNTIME)
    data.update(overrides)
    path.write_text(yaml.safe_dump(data))
    return path


def rows(images, filesystem=None) -> list[dict]:
    table = pads.dataset(images, filesystem=filesystem).to_table()
    return sorted(table.to_pylist(), key=lambda r: tuple(r[k] for k in KEY))


def keys(found: list[dict]) -> list[tuple]:
    return [tuple(r[k] for k in KEY) for r in found]


def pictures(images) -> list[tuple]:
    """Each image's key and PNG bytes (timings differ from run to run; pixels never do)."""
    return [(tuple(r[k] for k in KEY), r["image"]["bytes"]) for r in rows(images)]


def wait_for(condition, what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.time() + 240
    while not condition():
        assert process is None or process.poll() is None, process.communicate()
        assert time.time() < deadline, f"{what} did not happen in time"
        time.sleep(0.05)


def test_two_drivers_started_together_one_is_refused_and_rows_are_made_once(tmp_path, ray_address):
    spec = write_spec(tmp_path)
    out = tmp_path / "out"
    drivers = [driver(0.3, "generate", spec, "--out", out, "--address", ray_address)]
    drivers.append(driver(0.3, "generate", spec, "--out", out, "--address", ray_address))
    errs = [d.communicate(timeout=300)[1] for d in drivers]

    codes = [d.returncode for d in drivers]
    assert sorted(codes) == [EXIT_OK, EXIT_BAD_INPUT], errs
    winner = drivers[codes.index(EXIT_OK)]
    refusal = errs[codes.index(EXIT_BAD_INPUT)].strip().splitlines()[-1]
    assert refusal.startswith(f"sdbatch: error: --out: {out} is in use by run ")
    assert f"pid {winner.pid}," in refusal and "--force" in refusal
    found = rows(str(out / "images"))
    assert len(found) == 12 and len(set(keys(found))) == 12
    assert len(json.loads((out / "run.json").read_text())["history"]) == 1
    assert not (out / LEASE).exists(), "the winner releases the output when it is done"


def test_two_drivers_on_one_s3_output_one_is_refused(tmp_path, s3_server, s3_bucket):
    fs = s3_bucket
    spec = write_spec(tmp_path)
    env = {**s3_server, "RAY_ADDRESS": ""}  # workers read the bucket's endpoint from their env
    drivers = [driver(0.3, "generate", spec, "--out", "s3://runs/job", env=env) for _ in "ab"]
    errs = [d.communicate(timeout=300)[1] for d in drivers]

    codes = [d.returncode for d in drivers]
    assert sorted(codes) == [EXIT_OK, EXIT_BAD_INPUT], errs
    refusal = errs[codes.index(EXIT_BAD_INPUT)].strip().splitlines()[-1]
    assert "is in use by run " in refusal and f"pid {drivers[codes.index(0)].pid}," in refusal
    fs.invalidate_cache()
    found = rows("runs/job/images", fs)
    assert len(found) == 12 and len(set(keys(found))) == 12
    assert len(json.loads(fs.cat("runs/job/run.json"))["history"]) == 1


def test_a_bucket_that_becomes_unreachable_stops_the_job_at_once(tmp_path, s3_server, s3_bucket):
    fs = s3_bucket
    spec = write_spec(tmp_path)
    env = {**s3_server, "RAY_ADDRESS": ""}
    job = driver(0.5, "generate", spec, "--out", "s3://runs/job", env=env)
    wait_for(lambda: fs.exists("runs/job/_units/") and fs.ls("runs/job/_units/", refresh=True),
             "a first commit", job)  # fmt: skip
    s3_server.process.terminate()
    s3_server.process.wait()
    gone_since = time.time()

    _, err = job.communicate(timeout=240)
    assert job.returncode == EXIT_FAILED, err
    failed = [line for line in err.splitlines() if line.startswith("sdbatch: failed:")]
    assert len(failed) == 1 and "refused a write to s3://runs/job" in failed[0], err
    assert "will retry" not in err and "splitting" not in err and "Traceback" not in err
    assert time.time() - gone_since < 90


def test_an_overwrite_racing_a_running_job_leaves_no_row_of_the_old_run(tmp_path, ray_address):
    old_spec = write_spec(tmp_path, "old.yaml", seed=7)
    new_spec = write_spec(tmp_path, "new.yaml", seed=8)
    out = tmp_path / "out"

    # 1. the old job runs slowly; once it committed a unit, a new job with another seed starts
    old = driver(1.5, "generate", old_spec, "--out", out, "--address", ray_address)
    wait_for(lambda: list((out / "_units").glob("*.json")), "a first commit", old)
    new = ["generate", str(new_spec), "--out", str(out), "--address", ray_address]
    assert cli_main([*new, "--overwrite"]) == EXIT_BAD_INPUT  # held: refused without --force
    assert cli_main([*new, "--overwrite", "--force"]) == EXIT_OK

    # 2. the old driver learns at its next commit that it lost the output, and stops
    _, err = old.communicate(timeout=120)
    assert old.returncode == EXIT_FAILED, err
    assert "sdbatch: failed: run " in err and f"no longer holds {out}; it is now held by" in err

    # 3. every row is the new run's: the same bytes as the new job run alone
    alone = generate(load_spec(new_spec), output=str(tmp_path / "alone"), address=ray_address)
    assert alone.new_images == 12
    expected = rows(str(tmp_path / "alone" / "images"))
    found = rows(str(out / "images"))
    assert keys(found) == keys(expected)
    assert [r["image"]["bytes"] for r in found] == [r["image"]["bytes"] for r in expected]
    run = json.loads((out / "run.json").read_text())
    assert run["spec"]["seed"] == 8
    identities = {json.loads(p.read_text())["run"] for p in (out / "_units").glob("*.json")}
    assert len(identities) == 1


def lease_of(host: str, pid: int, renewed: float) -> bytes:
    return Holder("feedc0ffee00", host, pid, "2026-11-30T00:00:00+00:00", renewed).to_json()


def test_a_lease_is_refused_while_renewed_and_taken_over_when_stale_or_forced(
    tmp_path, ray_address, caplog
):
    spec = load_spec(write_spec(tmp_path))
    out = tmp_path / "out"
    out.mkdir()
    caplog.set_level(logging.WARNING, logger="sdbatch")

    (out / LEASE).write_bytes(lease_of("elsewhere", 4242, time.time()))
    with pytest.raises(InputError, match=r"in use by run feedc0ffee00 \(host elsewhere, pid 4242"):
        generate(spec, output=str(out), address=ray_address)
    assert sorted(p.name for p in out.iterdir()) == [LEASE], "nothing written by the refused run"

    (out / LEASE).write_bytes(lease_of("elsewhere", 4242, time.time() - STALE_SECONDS - 5))
    assert generate(spec, output=str(out), address=ray_address).new_images == 12
    assert "taking over" in caplog.text and "not renewed for" in caplog.text

    (out / LEASE).write_bytes(lease_of("elsewhere", 4242, time.time()))
    summary = generate(spec, output=str(out), address=ray_address, force=True)
    assert summary.new_images == 0 and "from run feedc0ffee00" in caplog.text
    assert not (out / LEASE).exists()


def test_a_lease_of_a_process_of_this_machine_that_is_gone_is_taken_over_at_once(
    tmp_path, ray_address, caplog
):
    spec = load_spec(write_spec(tmp_path))
    out = tmp_path / "out"
    out.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True, check=True)  # fmt: skip
    fs = Output(str(out)).fs
    from sdbatch.lease import acquire

    holder = acquire(fs, str(out))  # this process's identity, with the dead process's pid
    (out / LEASE).write_bytes(
        Holder(**{**holder.__dict__, "pid": int(gone.stdout), "run_id": "deadbeef0000"}).to_json()
    )
    caplog.set_level(logging.WARNING, logger="sdbatch")
    assert generate(spec, output=str(out), address=ray_address).new_images == 12
    assert f"process {int(gone.stdout)} is gone" in caplog.text


@pytest.fixture(scope="module")
def generated(tmp_path_factory, ray_address):
    """The small job, generated once: (spec path, output); tests change copies of it."""
    folder = tmp_path_factory.mktemp("generated")
    spec = write_spec(folder)
    assert generate(load_spec(spec), output=str(folder / "out"), address=ray_address).new_images
    return spec, folder / "out"


def copy_of(generated, tmp_path) -> tuple[Path, Path, dict[str, int]]:
    spec, original = generated
    out = tmp_path / "out"
    shutil.copytree(original, out)
    committed = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    return spec, out, committed


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_file_damaged_behind_its_marker_is_named_and_only_its_unit_redone(
    generated, tmp_path, ray_address, damage, caplog
):
    spec, out, committed = copy_of(generated, tmp_path)
    victim = sorted((out / "images").iterdir())[1]
    size = victim.stat().st_size
    if damage == "deleted":
        victim.unlink()
        what = "missing"
    else:
        victim.write_bytes(victim.read_bytes()[: size // 2])
        what = f"{size // 2:,} bytes, its marker says {size:,}"

    # 1. eval refuses in one line naming the file, before any work
    with pytest.raises(InputError, match=rf"images/{victim.name}: {what}; rerun `sdbatch gen"):
        evaluate(str(out))

    # 2. the rerun names it, regenerates that unit alone, and the folder reads whole again
    caplog.set_level(logging.INFO, logger="sdbatch")
    summary = generate(load_spec(spec), output=str(out), address=ray_address)
    assert summary.new_images == 4
    message = f"redoing 1 unit(s) whose files do not match their markers: images/{victim.name}"
    assert f"{message}: {what}" in caplog.text
    for name, mtime in committed.items():
        if name != victim.name:
            assert (out / "images" / name).stat().st_mtime_ns == mtime
    assert pictures(str(out / "images")) == pictures(str(generated[1] / "images"))


def test_verify_finds_a_changed_byte_that_sizes_cannot_and_a_verified_rerun_redoes_it(
    generated, tmp_path, ray_address, capsys, caplog
):
    spec, out, _ = copy_of(generated, tmp_path)
    victim = sorted((out / "images").iterdir())[0]
    body = bytearray(victim.read_bytes())
    body[len(body) // 2] ^= 0xFF  # the same size, one byte different
    victim.write_bytes(bytes(body))

    assert cli_main(["verify", str(out), "--quick"]) == EXIT_OK
    assert cli_main(["verify", str(out)]) == EXIT_INCOMPLETE
    printed = capsys.readouterr().out
    assert f"redo images/{victim.name}: sha256 differs" in printed
    assert "a rerun of generate would redo 1 unit(s)" in printed

    args = ["generate", str(spec), "--out", str(out), "--address", ray_address]
    caplog.set_level(logging.INFO, logger="sdbatch")
    assert cli_main(args) == EXIT_OK and "nothing to generate" in caplog.text
    caplog.clear()
    assert cli_main([*args, "--verify"]) == EXIT_OK
    assert "redoing 1 unit(s)" in caplog.text and "sha256 differs" in caplog.text
    assert cli_main(["verify", str(out)]) == EXIT_OK
    assert "every committed unit matches its marker" in capsys.readouterr().out
    assert pictures(str(out / "images")) == pictures(str(generated[1] / "images"))


def test_a_store_shared_by_no_other_process_is_refused(tmp_path, capsys):
    spec = write_spec(tmp_path)
    assert cli_main(["generate", str(spec), "--out", "memory://sdbatch/out"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("sdbatch: error: --out: memory://sdbatch/out is in ")


def test_a_folder_holding_only_sdbatch_leftovers_is_used(tmp_path, ray_address):
    spec = load_spec(write_spec(tmp_path))
    out = tmp_path / "out"
    (out / "_tmp").mkdir(parents=True)
    (out / "_tmp" / "0a1b-probe").write_bytes(b"\0" * 100)  # left by a start on a full disk
    assert generate(spec, output=str(out), address=ray_address).new_images == 12
    (out / "notes.txt").write_text("mine")
    shutil.rmtree(out / "images")
    (out / "run.json").unlink()
    with pytest.raises(InputError, match=r"holds files sdbatch did not write \(notes.txt\)"):
        generate(spec, output=str(out), address=ray_address)


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MB tmpfs, mounted for the test (needs root, as in CI); unmounted after."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()!r}); "
                    "tests/test_worker.py simulates the failed write instead")  # fmt: skip
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk: Path) -> Path:
    """Take every free byte of `disk` with one file; returns it."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\xff" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def test_a_full_disk_stops_the_job_at_once_and_a_rerun_after_freeing_space_completes(
    small_disk, tmp_path, ray_address
):
    spec = write_spec(tmp_path)
    out = small_disk / "out"
    args = ["generate", spec, "--out", out, "--address", ray_address]

    # 1. the disk fills up once the first unit is committed
    job = driver(0.5, *args)
    wait_for(lambda: list((out / "_units").glob("*.json")), "a first commit", job)
    filler = fill(small_disk)
    full_since = time.time()
    _, err = job.communicate(timeout=240)
    stopped_after = time.time() - full_since

    # 2. the job stopped at its next commit, said why in one line, and tried nothing else
    assert job.returncode == EXIT_FAILED, err
    failed = [line for line in err.splitlines() if line.startswith("sdbatch: failed:")]
    assert len(failed) == 1 and "No space left on device" in failed[0]
    assert f"refused a write to {out}" in failed[0]
    assert "will retry" not in err and "splitting" not in err and "Traceback" not in err
    assert stopped_after < 30, f"took {stopped_after:.0f} s to stop"
    marked = {json.loads(p.read_text())["file"] for p in (out / "_units").glob("*.json")}
    assert {f"images/{p.name}" for p in (out / "images").iterdir()} == marked

    # 3. with space again, the same command completes the job, every row once
    filler.unlink()
    rerun = driver(0, *args)
    _, err = rerun.communicate(timeout=240)
    assert rerun.returncode == EXIT_OK, err
    found = rows(str(out / "images"))
    assert len(found) == 12 and len(set(keys(found))) == 12


def test_a_disk_full_at_start_is_refused_before_work_and_leaves_nothing(
    small_disk, tmp_path, capsys
):
    spec = write_spec(tmp_path)
    filler = fill(small_disk)
    out = small_disk / "out"
    assert cli_main(["generate", str(spec), "--out", str(out)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"sdbatch: error: --out: cannot write one unit's worth (6 kB) to {out}")
    assert "No space left on device" in err
    assert not out.exists()
    filler.unlink()


def test_the_start_up_probe_never_removes_what_another_driver_wrote_meanwhile(
    tmp_path, monkeypatch
):
    out = Output(str(tmp_path / "out"))  # not there yet: the probe makes it
    write = out.fs.pipe_file

    def another_driver_starts(path, value, **kwargs):
        write(path, value, **kwargs)
        (tmp_path / "out" / LEASE).write_bytes(b"{}")  # its lease lands while the probe runs

    monkeypatch.setattr(out.fs, "pipe_file", another_driver_starts)
    out.check_writable(1000)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [LEASE]
