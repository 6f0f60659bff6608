"""Generation end to end on a real local Ray instance with builtin:tiny."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import LONG_PROMPT, PROMPTS, REPO, job, suite_data
from PIL import Image

from sdbatch.builtin import builtin_path
from sdbatch.cli import main as cli_main
from sdbatch.errors import InputError
from sdbatch.generation import generate
from sdbatch.prompts import derive_prompt_ids
from sdbatch.spec import load_spec, parse_spec
from sdbatch.toy.world import write_reference

KEY = ["prompt_id", "sample_index", "config_id"]


def read(output) -> list[dict]:
    """Every row of an output, sorted by key."""
    rows = pads.dataset(str(output / "images")).to_table().to_pylist()
    return sorted(rows, key=lambda r: tuple(r[k] for k in KEY))


def keys(rows) -> list[tuple]:
    return [tuple(r[k] for k in KEY) for r in rows]


def pixels(row) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])), dtype=np.int16)


def sdbatch(*args, env=None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sdbatch.cli", *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def kill_once(driver: subprocess.Popen, ready: Callable[[], Any]) -> None:
    """SIGKILL `driver` as soon as `ready()` holds (within 4 minutes), while it is still running."""
    deadline = time.time() + 240
    while not ready():
        assert driver.poll() is None, driver.communicate()
        assert time.time() < deadline, "no unit finished in time"
        time.sleep(0.1)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    # Let the dead driver's actors be reaped before looking at what was committed.
    time.sleep(3)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ray_address):
    """One uninterrupted run of the standard small sweep: (spec path, output)."""
    folder = tmp_path_factory.mktemp("reference")
    pq.write_table(pa.table({"prompt": PROMPTS}), folder / "prompts.parquet")
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job(folder / "prompts.parquet")))
    summary = generate(load_spec(path), output=str(folder / "out"), address=ray_address)
    assert summary.new_images == summary.total_images == 6 * 2 * 2 * 2
    return path, folder / "out"


def test_sweep_rows_are_complete_unique_and_self_consistent(reference):
    spec_path, output = reference
    rows = read(output)
    spec = load_spec(spec_path)
    assert len(rows) == 6 * 4 * 2
    assert len(set(keys(rows))) == len(rows)
    run = json.loads((output / "run.json").read_text())
    configs = {c["config_id"]: c for c in run["configs"]}
    prompt_ids = {r["prompt_id"] for r in rows}
    assert set(keys(rows)) == {(p, s, c) for p in prompt_ids for s in (0, 1) for c in configs}
    for row in rows:
        config = configs[row["config_id"]]
        for field in ("scheduler", "num_inference_steps", "guidance_scale", "height", "width"):
            assert row[field] == config[field]
        assert row["model"] == "builtin:tiny" and row["dtype"] == "fp32"
        assert pixels(row).shape == (32, 32, 3)
    # the same prompt and sample start from the same seed in every configuration
    seeds = {(r["prompt_id"], r["sample_index"]): r["seed"] for r in rows}
    assert all(seeds[(r["prompt_id"], r["sample_index"])] == r["seed"] for r in rows)
    assert len(set(seeds.values())) == 12
    # provenance
    assert run["spec"]["sweep"]["scheduler"] == list(spec.sweep.scheduler)
    assert set(run["versions"]) >= {"sdbatch", "torch", "diffusers", "transformers", "ray"}
    assert run["model"]["identity"].startswith("sha256:")
    assert run["history"][-1]["new_images"] == 48
    # each configuration's cost: 2 steps, twice under guidance
    assert sorted(c["unet_evals_per_image"] for c in configs.values()) == [2, 2, 4, 4]


def test_output_reads_with_datasets_pandas_and_ray_data(reference, tmp_path):
    datasets = pytest.importorskip("datasets")
    import ray

    _, output = reference
    ds = datasets.load_dataset(
        "parquet",
        data_files=str(output / "images" / "*.parquet"),
        split="train",
        cache_dir=str(tmp_path / "hf"),
    )
    assert len(ds) == 48
    assert isinstance(ds.features["image"], datasets.Image)
    image = ds[0]["image"]
    assert isinstance(image, Image.Image) and image.size == (32, 32)
    frame = pd.read_parquet(output / "images", columns=[*KEY, "guidance_scale"])
    assert len(frame) == 48 and not frame.duplicated(KEY).any()
    assert ray.data.read_parquet(str(output / "images")).count() == 48


def test_images_do_not_depend_on_actor_count_batch_or_shard_size(reference, spec_file, ray_address):
    spec_path, output = reference
    data = job(
        load_spec(spec_path).prompts.path, runtime={"actors": 2, "batch_size": 3, "shard_size": 1}
    )
    other = spec_file(data).parent / "out-2-actors"
    summary = generate(load_spec(spec_file(data)), output=str(other), address=ray_address)
    assert summary.new_images == 48
    run = json.loads((other / "run.json").read_text())
    workers = run["history"][-1]["workers"]
    assert len(workers) == 2
    assert all(w["device"] == "cpu" and w["gpu"] is None for w in workers)
    a, b = read(output), read(other)
    assert keys(a) == keys(b)
    assert all(x["seed"] == y["seed"] for x, y in zip(a, b, strict=True))
    diffs = [np.abs(pixels(x) - pixels(y)).max() for x, y in zip(a, b, strict=True)]
    assert max(diffs) <= 2
    assert {x["batch_size"] for x in a} == {4} and {y["batch_size"] for y in b} <= {1, 2, 3}


def test_resume_after_the_driver_is_killed(reference, tmp_path, spec_file, ray_address):
    spec_path, reference_out = reference
    slow = job(
        load_spec(spec_path).prompts.path,
        sweep={"num_inference_steps": [25], "height": 64, "width": 64},
        runtime={"batch_size": 1, "shard_size": 1},
    )
    path = spec_file(slow)
    output = tmp_path / "killed"
    driver = sdbatch("generate", str(path), "--out", str(output), "--address", ray_address)
    markers = output / "_units"
    kill_once(driver, lambda: len(list(markers.glob("*.json")) if markers.exists() else []) >= 2)
    before = {p.name: p.stat().st_mtime_ns for p in markers.glob("*.json")}
    files = {p.name: p.stat().st_mtime_ns for p in (output / "images").glob("*.parquet")}
    units = 6 * 4
    assert 2 <= len(before) < units, "the kill should land mid-job"

    rerun = sdbatch("generate", str(path), "--out", str(output), "--address", ray_address)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert f"resuming: {len(before) * 2} images done" in err
    after = {p.name: p.stat().st_mtime_ns for p in markers.glob("*.json")}
    assert len(after) == units
    assert all(after[name] == mtime for name, mtime in before.items()), "done units were redone"
    for name, mtime in files.items():
        if name.replace(".parquet", ".json") in before:
            assert (output / "images" / name).stat().st_mtime_ns == mtime
    rows = read(output)
    assert len(rows) == 6 * 4 * 2 and len(set(keys(rows))) == len(rows)
    assert not list((output / "_tmp").glob("*")) if (output / "_tmp").exists() else True

    # and the result equals an uninterrupted run of the same spec, byte for byte
    whole = generate(
        parse_spec({**slow, "name": "whole"}), output=str(tmp_path / "whole"), address=ray_address
    )
    assert whole.new_images == 48
    assert [r["image"]["bytes"] for r in rows] == [
        r["image"]["bytes"] for r in read(tmp_path / "whole")
    ]
    assert reference_out.exists()


def test_a_published_file_without_marker_is_never_duplicated(reference, tmp_path, ray_address):
    spec_path, output = reference
    copy = tmp_path / "crashed"
    shutil.copytree(output, copy)
    # A crash between "publish" and "mark done": the file is there, its marker is not.
    marker = sorted((copy / "_units").glob("*.json"))[0]
    marker.unlink()
    (copy / "_tmp").mkdir(exist_ok=True)
    (copy / "_tmp" / "half-written.parquet").write_bytes(b"PAR1 truncated")
    summary = generate(load_spec(spec_path), output=str(copy), address=ray_address)
    assert summary.new_images == 4  # one unit: 2 prompts x 2 samples
    rows = read(copy)
    assert len(rows) == 48 and len(set(keys(rows))) == 48
    assert not (copy / "_tmp" / "half-written.parquet").exists()


def test_rerun_extends_with_new_configurations_and_prompts(
    tmp_path, prompt_file, spec_file, ray_address
):
    path = prompt_file()
    output = str(tmp_path / "out")
    first = job(path, sweep={"scheduler": ["ddim"], "guidance_scale": [7.5]}, prompts={"limit": 4})
    assert generate(parse_spec(first), output=output, address=ray_address).new_images == 4 * 2
    done = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "_units").iterdir()}

    wider = job(path, sweep={"scheduler": ["ddim", "pndm"], "guidance_scale": [7.5]})
    summary = generate(parse_spec(wider), output=output, address=ray_address)
    assert summary.new_images == 6 * 2 * 2 - 4 * 2
    rows = read(tmp_path / "out")
    assert len(rows) == 24 and len(set(keys(rows))) == 24
    assert all((tmp_path / "out" / "_units" / n).stat().st_mtime_ns == t for n, t in done.items())
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert len(run["configs"]) == 2 and run["prompts"]["count"] == 6
    assert [h["new_images"] for h in run["history"]] == [8, 16]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seed": 8}, "seed: 7 -> 8"),
        ({"sweep": {"height": 64}}, "sweep.height: 32 -> 64"),
        ({"sweep": {"scheduler": ["ddim"]}}, "configurations removed: euler_a-"),
        ({"prompts": {"limit": 3}}, "3 prompt(s) removed"),
        ({"model": "TINY_COPY"}, "model.identity"),
    ],
)
def test_rerun_with_a_different_job_is_refused(change, message, reference, tmp_path, ray_address):
    spec_path, output = reference
    data = job(load_spec(spec_path).prompts.path, **change)
    if data["model"] == "TINY_COPY":
        data["model"] = str(tmp_path / "tiny")
        shutil.copytree(builtin_path("tiny"), data["model"])
        (tmp_path / "tiny" / "scheduler" / "scheduler_config.json").write_text(
            (tmp_path / "tiny" / "scheduler" / "scheduler_config.json")
            .read_text()
            .replace('"steps_offset": 1', '"steps_offset": 0')
        )
    before = sorted(p.name for p in (output / "_units").iterdir())
    with pytest.raises(InputError, match=r"--out: .* holds a different job") as error:
        generate(parse_spec(data), output=str(output), address=ray_address)
    assert message in str(error.value) and "--overwrite" in str(error.value)
    assert sorted(p.name for p in (output / "_units").iterdir()) == before


@pytest.mark.parametrize("chosen", ["spec", "default"])
def test_refusal_names_the_output_as_the_user_chose_it(chosen, reference, tmp_path, monkeypatch):
    """Without --out, a refused rerun names the spec's `output`, or its default, not --out."""
    spec_path, output = reference
    monkeypatch.chdir(tmp_path)
    held = tmp_path / "out" / "test"  # the default, out/NAME
    held.mkdir(parents=True)
    for name in ("run.json", "prompts.parquet"):
        shutil.copy(output / name, held / name)
    data = job(load_spec(spec_path).prompts.path, seed=8)
    if chosen == "spec":
        data["output"] = str(held)
    with pytest.raises(InputError) as error:
        generate(parse_spec(data))
    field = "output" if chosen == "spec" else "output (by default out/NAME)"
    where = held if chosen == "spec" else "out/test"
    assert str(error.value) == (
        f"{field}: {where} holds a different job (seed: 7 -> 8); use --overwrite to start over, "
        "or choose another output with --out"
    )


def test_overwrite_starts_over_and_edited_prompts_are_refused(tmp_path, prompt_file, ray_address):
    output = str(tmp_path / "out")
    ids = {"id": [f"id{i}" for i in range(len(PROMPTS))]}
    sweep = {"scheduler": ["ddim"], "guidance_scale": [7.5]}
    small = job(prompt_file(**ids), sweep=sweep, prompts={"id_column": "id"})
    generate(parse_spec(small), output=output, address=ray_address)
    texts = [*PROMPTS[:-1], "an edited prompt"]
    edited = job(prompt_file(texts, **ids), sweep=sweep, prompts={"id_column": "id"})
    with pytest.raises(InputError, match=r"1 prompt\(s\) changed"):
        generate(parse_spec(edited), output=output, address=ray_address)
    summary = generate(parse_spec(edited), output=output, address=ray_address, overwrite=True)
    assert summary.new_images == 12
    rows = read(tmp_path / "out")
    assert len(rows) == 12 and "an edited prompt" in {r["prompt"] for r in rows}


def test_dry_run_writes_nothing(tmp_path, prompt_file, ray_address):
    summary = generate(parse_spec(job(prompt_file())), output=str(tmp_path / "out"), dry_run=True)
    assert summary.total_images == 48 and summary.new_images == 0
    assert not (tmp_path / "out").exists()


def test_a_huge_job_needs_yes(tmp_path, prompt_file, spec_file, capsys, caplog):
    """6 prompts x 4 configurations x 5000 images: over the limit, refused unless confirmed."""
    path = spec_file(job(prompt_file(), sweep={"images_per_prompt": 5000}))
    out = tmp_path / "out"
    assert cli_main(["generate", str(path), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        "sdbatch: error: --yes: this job would generate 120,000 images (6 prompts x "
        "4 configurations x 5000 images), more than 100,000; pass --yes to confirm\n"
    )
    assert not out.exists()
    for confirm in ([], ["--yes"]):
        caplog.clear()
        assert cli_main(["generate", str(path), "--out", str(out), "--dry-run", *confirm]) == 0
        assert "dry run: 120000 images left in 12 units" in caplog.text
    assert not out.exists()
    # Confirmed, it goes on to the next check (here an output under a file), not to the limit.
    (tmp_path / "file").write_text("")
    assert cli_main(["generate", str(path), "--out", str(tmp_path / "file" / "out"), "--yes"]) == 2
    assert capsys.readouterr().err.startswith("sdbatch: error: --out: cannot write one unit's")


@pytest.mark.parametrize(("sweep_negative", "count", "first"), [("", 2, 1), (LONG_PROMPT, 3, 0)])
def test_long_prompts_and_negative_prompts_are_counted_with_one_warning(
    tmp_path, prompt_file, caplog, sweep_negative, count, first
):
    texts = ["a cat", "a dog", LONG_PROMPT]
    path = prompt_file(texts, neg=[None, LONG_PROMPT, None])
    data = job(path, prompts={"negative_column": "neg"}, sweep={"negative_prompt": sweep_negative})
    generate(parse_spec(data), output=str(tmp_path / "out"), dry_run=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    first_id = derive_prompt_ids(texts)[first]
    assert warnings == [
        f"{count} prompt(s) or their negative prompts are longer than the model's tokenizer "
        f"takes and will be truncated, first {first_id!r}"
    ]


def test_output_that_is_not_ours_and_fp16_on_cpu_are_refused(tmp_path, prompt_file, ray_address):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"not ours")
    with pytest.raises(InputError, match=r"--out: .* did not write \(holiday.jpg\) and no sdbatch"):
        generate(
            parse_spec(job(prompt_file())), output=str(foreign), address=ray_address, overwrite=True
        )
    assert (foreign / "holiday.jpg").exists()
    fp16 = job(prompt_file(), runtime={"dtype": "fp16"})
    with pytest.raises(InputError, match=r"runtime\.dtype: fp16 needs GPUs"):
        generate(parse_spec(fp16), output=str(tmp_path / "out"), address=ray_address)
    assert not (tmp_path / "out" / "images").exists()


@pytest.mark.parametrize("where", ["under a file", "/proc/sdbatch-out"])
def test_an_output_that_cannot_be_written_exits_2(where, tmp_path, prompt_file, spec_file, capsys):
    """Checked by writing a probe file before Ray starts (chmod cannot stop root, so: a path under
    a regular file, and one under /proc)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "out" if where == "under a file" else Path(where)
    path = spec_file(job(prompt_file()))
    assert cli_main(["generate", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdbatch: error: --out: cannot write one unit's worth (6 kB) to "), err
    assert f" to {out} (" in err
    assert err.count("\n") == 1
    assert not out.exists() and blocker.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "job.yaml", "prompts.parquet"]


def test_hub_id_loads_from_the_offline_cache(tmp_path, prompt_file, spec_file):
    """A hub id resolved and loaded through the HF cache with HF_HUB_OFFLINE=1 (own local Ray)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--sdbatch--tiny-test"
    shutil.copytree(builtin_path("tiny"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    data = job(prompt_file(PROMPTS[:2]), model="sdbatch/tiny-test")
    data["sweep"] = {**data["sweep"], "scheduler": ["ddim"], "guidance_scale": [7.5]}
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    proc = sdbatch("generate", str(spec_file(data)), "--out", str(tmp_path / "out"), env=env)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["model"]["identity"] == f"hub:sdbatch/tiny-test@{commit}"
    assert run["prompts"]["truncated"] == 0  # counted with the tokenizer from the offline cache
    assert len(read(tmp_path / "out")) == 4

    missing = job(prompt_file(PROMPTS[:2]), model="sdbatch/not-cached")
    proc = sdbatch("generate", str(spec_file(missing)), "--out", str(tmp_path / "out2"), env=env)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err.startswith("sdbatch: error: model: cannot find 'sdbatch/not-cached'"), err


def test_demo_command_runs_end_to_end(tmp_path):
    """The README's first command, with its own local Ray instance."""
    # HOME holds the reference statistics cache (~/.cache/sdbatch): keep it in the test's folder.
    env = {"RAY_ADDRESS": "", "HOME": str(tmp_path)}
    proc = sdbatch("demo", "--out", str(tmp_path / "demo"), env=env, cwd=REPO)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    report = tmp_path / "demo" / "report" / "index.html"
    assert out.strip() == str(report)
    # Printed once, on stdout; no notice from the local Ray instance nor lines from its workers.
    assert str(report) not in err and "Token authentication" not in err
    assert not [line for line in err.splitlines() if " pid=" in line], err
    spec = load_spec(REPO / "jobs" / "demo.yaml")
    sweep = spec.sweep
    configs = len(sweep.scheduler) * len(sweep.num_inference_steps) * len(sweep.guidance_scale)
    prompts = len(pd.read_parquet(spec.prompts.path))
    expected = prompts * configs * sweep.images_per_prompt
    assert len(read(tmp_path / "demo")) == expected
    assert f"done: {expected} new images" in err
    table = pd.read_csv(tmp_path / "demo" / "metrics" / "configs.csv")
    assert len(table) == configs and table["n_images"].sum() == expected
    metrics = ["clip_score", "fid", "kid_mean", "color_accuracy", "shape_accuracy"]
    assert table[metrics].notna().all().all()


def test_partiprompts_longest_and_unicode_prompts_end_to_end(tmp_path, parti, ray_address, caplog):
    """Real prompts far beyond CLIP's 77 tokens, and non-ASCII ones, through generate; a blank
    row is skipped under `prompts.blank: skip`, and run.json counts both."""
    converted = tmp_path / "parti.parquet"
    assert cli_main(["prompts", str(parti), "-o", str(converted)]) == 0
    table = pq.read_table(converted).to_pandas()
    longest = table.loc[table["prompt"].str.len().nlargest(4).index]
    unicode = table[~table["prompt"].map(str.isascii)].head(2)
    blank = table.head(1).assign(id="blank", prompt=" ")
    subset = pa.Table.from_pandas(pd.concat([longest, blank, unicode]), preserve_index=False)
    pq.write_table(subset, tmp_path / "subset.parquet")
    data = job(tmp_path / "subset.parquet", prompts={"id_column": "id", "blank": "skip"})
    data["sweep"] = {**data["sweep"], "scheduler": ["euler"], "guidance_scale": [7.5]}
    summary = generate(parse_spec(data), output=str(tmp_path / "out"), address=ray_address)
    assert summary.new_images == 6 * 2
    rows = read(tmp_path / "out")
    kept = set(subset.column("prompt").to_pylist()) - {" "}
    assert {r["prompt"] for r in rows} == kept
    assert max(len(r["prompt"]) for r in rows) > 300  # stored whole, not as the tokenizer cut it
    assert {r["prompt_id"] for r in rows} == set(subset.column("id").to_pylist()) - {"blank"}
    # The four longest and the Rio de Janeiro one pass builtin:tiny's 77 byte tokens.
    counts = json.loads((tmp_path / "out" / "run.json").read_text())["prompts"]
    assert (counts["count"], counts["skipped_blank"], counts["truncated"]) == (6, 1, 5)
    assert "skipped 1 null or blank prompt(s) (prompts.blank: skip), first at row 4" in caplog.text
    warning = "5 prompt(s) or their negative prompts are longer than the model's tokenizer takes"
    assert f"{warning} and will be truncated, first {longest['id'].iloc[0]!r}" in caplog.text


def test_partiprompts_run_keeps_library_warnings_in_the_log_file(tmp_path, parti):
    """40 PartiPrompts prompts, 2 of them far over CLIP's 77 tokens, through the CLI with its own
    Ray instance: diffusers' truncation warning, once per batch in each worker, goes to the
    output's _logs/, and stderr keeps sdbatch's few lines (the truncated prompts counted once)."""
    converted = tmp_path / "parti.parquet"
    assert cli_main(["prompts", str(parti), "-o", str(converted)]) == 0
    table = pq.read_table(converted).to_pandas()
    longest = table.loc[table["prompt"].str.len().nlargest(2).index]
    subset = pd.concat([longest, table.drop(longest.index).head(38)])
    pq.write_table(pa.Table.from_pandas(subset, preserve_index=False), tmp_path / "subset.parquet")
    data = job(tmp_path / "subset.parquet", prompts={"id_column": "id"})
    data["sweep"] = {**data["sweep"], "scheduler": ["euler"], "guidance_scale": [7.5]}
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(data))
    proc = sdbatch("generate", str(spec), "--out", str(tmp_path / "out"), env={"RAY_ADDRESS": ""})
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    # Before, each batch holding a long prompt added a line of thousands of characters.
    assert len(err.encode()) < 2_000, err
    assert "\r" not in err, err  # stderr is no terminal: progress is lines, not a bar
    lines = [line for line in err.splitlines() if line]
    assert max(map(len, lines)) < 300, err
    # No worker's lines ("(Worker pid=...)") and no notice of the local Ray instance.
    assert all(line.startswith("sdbatch: ") for line in lines), err
    assert f"sdbatch: the workers' library warnings are in {tmp_path}/out/_logs" in lines
    logs = "".join(p.read_text() for p in (tmp_path / "out" / "_logs").glob("worker-*.log"))
    assert "truncated because CLIP can only handle sequences up to 77 tokens" in logs
    assert len(read(tmp_path / "out")) == 40 * 2


def test_quiet_libraries_keeps_errors_on_stderr(tmp_path):
    """In a worker process, library and Python warnings go to the log file, errors to both."""
    script = f"""
import logging, warnings
from sdbatch.worker_logs import quiet_libraries
print(quiet_libraries({str(tmp_path / "logs")!r}))
logging.getLogger("diffusers.pipelines").warning("a diffusers warning")
logging.getLogger("transformers.models").warning("a transformers warning")
warnings.warn("a Python warning")
logging.getLogger("diffusers.pipelines").error("a diffusers error")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stderr == "a diffusers error\n"
    path = Path(done.stdout.strip())
    assert path.parent == tmp_path / "logs" and path.name.startswith("worker-")
    text = path.read_text()
    for message in ("diffusers warning", "transformers warning", "Python warning", "error"):
        assert message in text


def test_output_on_s3_generates_resumes_and_reads(s3_server, s3_bucket, prompt_file, spec_file):
    fs = s3_bucket
    data = job(prompt_file(PROMPTS[:4]))
    data["sweep"] = {**data["sweep"], "scheduler": ["ddim"]}
    spec = str(spec_file(data))
    env = {**s3_server, "RAY_ADDRESS": ""}
    first = sdbatch("generate", spec, "--out", "s3://runs/job", env=env)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    # A crash between publish and mark: an unmarked file, and a marker that never got written.
    markers = sorted(fs.ls("runs/job/_units"))
    fs.rm(markers[0])
    fs.pipe("runs/job/images/orphan.parquet", b"never marked done")
    again = sdbatch("generate", spec, "--out", "s3://runs/job", env=env)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert "resuming: 12 images done, 4 left in 1 units" in err
    fs.invalidate_cache()
    assert "runs/job/images/orphan.parquet" not in fs.ls("runs/job/images")
    rows = pads.dataset("runs/job/images", filesystem=fs).to_table(columns=KEY).to_pylist()
    assert len(rows) == 4 * 2 * 2 and len({tuple(r.values()) for r in rows}) == len(rows)


def test_output_on_s3_survives_a_killed_driver_and_evaluates(
    s3_server, s3_bucket, tmp_path, spec_file
):
    fs = s3_bucket
    pq.write_table(pa.table({"prompt": PROMPTS}), tmp_path / "prompts.parquet")
    slow = job(
        tmp_path / "prompts.parquet",
        sweep={"scheduler": ["ddim"], "num_inference_steps": [25], "height": 64, "width": 64},
        runtime={"batch_size": 1, "shard_size": 1},
    )
    spec = str(spec_file(slow))
    env = {**s3_server, "RAY_ADDRESS": ""}
    units = 6 * 2

    # 1. SIGKILL the driver once a unit is committed
    driver = sdbatch("generate", spec, "--out", "s3://runs/job", env=env)
    kill_once(
        driver, lambda: fs.exists("runs/job/_units") and fs.ls("runs/job/_units", refresh=True)
    )
    fs.invalidate_cache()
    committed = len(fs.ls("runs/job/_units"))
    assert 1 <= committed < units, "the kill should land mid-job"
    # what a reader of images/ sees is whole Parquet files only, never a partial object
    for path in fs.ls("runs/job/images"):
        with fs.open(path, "rb") as f:
            assert pq.read_metadata(f).num_rows == 2

    # 2. the same command resumes
    rerun = sdbatch("generate", spec, "--out", "s3://runs/job", env=env)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert "resuming:" in err
    fs.invalidate_cache()
    rows = pads.dataset("runs/job/images", filesystem=fs).to_table(columns=KEY).to_pylist()
    assert len(rows) == units * 2 and len({tuple(r.values()) for r in rows}) == len(rows)

    # 3. and the evaluation reads and writes the bucket too
    write_reference(str(tmp_path / "reference.parquet"), count=40, size=32)
    suite = suite_data(tmp_path / "reference.parquet", tmp_path / "cache", runtime={"actors": 1})
    suite_path = tmp_path / "suite.yaml"
    suite_path.write_text(yaml.safe_dump(suite))
    evaluation = sdbatch("eval", "s3://runs/job", "--suite", str(suite_path), env=env)
    _, err = evaluation.communicate(timeout=300)
    assert evaluation.returncode == 0, err
    fs.invalidate_cache()
    with fs.open("runs/job/metrics/configs.parquet", "rb") as f:
        configs = pq.read_table(f).to_pandas()
    assert sorted(configs["n_images"]) == [12, 12]
    assert configs["fid"].notna().all() and configs["clip_score"].notna().all()
    assert json.loads(fs.cat("runs/job/metrics/metrics.json"))
    assert not fs.exists("runs/job/_tmp") or not fs.ls("runs/job/_tmp", refresh=True)
