"""The runtime's speed options (compile, channels_last, attention, VAE tiling and slicing,
batch_size: auto, bf16): each applied, recorded, and making the images the defaults make."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import job
from test_worker import TINY, OutOfMemoryAbove, one_unit, pixels, run

from sdbatch.generation import generate
from sdbatch.lease import acquire
from sdbatch.output import Output
from sdbatch.spec import Runtime, load_spec
from sdbatch.speed import VAE_TILING_SIDE, tile_vae
from sdbatch.sweep import Config
from sdbatch.worker import GenerationSetup, Worker

TEXTS = ("a red circle", "a blue square", "a green triangle")


def worker(output, batch_size=2, **runtime) -> Worker:
    holder = acquire(Output(str(output)).fs, str(output))
    setup = GenerationSetup(
        (TINY,), "fp32", str(output), holder.run_id, batch_size, 1, runtime=Runtime(**runtime)
    )
    return Worker(setup)


def images(w: Worker, unit) -> tuple[list[dict], list]:
    """The unit's rows as committed, and its batch timings."""
    _, marker = run(w, unit)
    return pq.read_table(Output(w.setup.output).path(marker.file)).to_pylist(), marker.batches


def largest_difference(rows, expected) -> int:
    assert [(r["prompt_id"], r["seed"]) for r in rows] == [
        (r["prompt_id"], r["seed"]) for r in expected
    ]
    return max(
        int(np.abs(pixels(a["image"]["bytes"]) - pixels(b["image"]["bytes"])).max())
        for a, b in zip(rows, expected, strict=True)
    )


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    """The defaults' images of a 3-image unit at batch 2 (a full batch and a short one)."""
    unit = one_unit(Config("euler", 2, 7.5, 32, 32, ""), texts=TEXTS)
    return unit, images(worker(tmp_path_factory.mktemp("eager")), unit)[0]


@pytest.mark.slow
def test_compile_pads_the_short_batch_and_makes_the_eager_images(eager, tmp_path):
    """One compiled shape: the short last batch runs padded to 2, and its extra image is dropped.
    The first call (compiling) is a recorded warm-up; the images equal eager's within 1/255."""
    unit, expected = eager
    w = worker(tmp_path, compile=True)
    calls = []
    w.pipe.unet.register_forward_pre_hook(lambda _, args: calls.append(args[0].shape[0]))
    rows, batches = images(w, unit)
    assert largest_difference(rows, expected) <= 1
    assert set(calls) == {4}  # 2 images x 2 guidance passes, the short batch's call included
    assert [(b.images, b.warmup) for b in batches] == [(2, True), (1, False)]
    assert [r["batch_size"] for r in rows] == [2, 2, 1]
    speed = w.describe()["speed"]
    assert speed["compile"] == "default"
    assert speed["warmup_seconds"] == pytest.approx(batches[0].seconds, abs=1e-3)
    # the warm-up compiled; the padded short batch ran the compiled graph, far faster
    assert batches[1].seconds < batches[0].seconds / 5


def test_channels_last_eager_attention_and_slicing_make_the_same_images(eager, tmp_path):
    unit, expected = eager
    w = worker(tmp_path, channels_last=True, attention="eager", vae_slicing=True)
    rows, _ = images(w, unit)
    assert largest_difference(rows, expected) <= 1
    processors = {type(p).__name__ for p in w.pipe.unet.attn_processors.values()}
    assert processors == {"AttnProcessor"}
    weight = w.pipe.unet.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert w.pipe.vae.use_slicing
    speed = w.describe()["speed"]
    assert speed["attention"] == "eager" and speed["channels_last"] and speed["vae_slicing"]
    assert speed["compile"] is None and speed["vae_tiled_sizes"] == []


def test_defaults_on_cpu_keep_the_pipeline_as_loaded(eager, tmp_path):
    w = worker(tmp_path)
    assert {type(p).__name__ for p in w.pipe.unet.attn_processors.values()} == {"AttnProcessor2_0"}
    assert w.pipe.unet.conv_in.weight.is_contiguous()
    speed = w.describe()["speed"]
    assert speed == {
        "attention": "sdpa",
        "channels_last": False,
        "vae_slicing": False,
        "compile": None,
        "vae_tiled_sizes": [],
        "batch_size": 2,
        "batch_probe": {},
        "warmup_seconds": 0.0,
    }


def test_vae_tiling_decodes_in_tiles_when_on_and_auto_above_1024(tmp_path):
    # builtin:tiny's VAE tiles latents above 8 px: images above 64 px
    unit = one_unit(Config("euler", 2, 7.5, 96, 96, ""), texts=TEXTS[:2])
    expected, _ = images(worker(tmp_path / "whole"), unit)
    w = worker(tmp_path / "tiled", vae_tiling=True)
    tiled = []
    decode = w.pipe.vae.tiled_decode
    w.pipe.vae.tiled_decode = lambda *a, **k: tiled.append(1) or decode(*a, **k)
    rows, _ = images(w, unit)
    assert len(tiled) == 1 and w.describe()["speed"]["vae_tiled_sizes"] == [[96, 96]]
    # blended tiles change pixels: each image nearer its untiled self than the other image
    tiled, whole = ([pixels(r["image"]["bytes"]) for r in rs] for rs in (rows, expected))
    mean = lambda a, b: np.abs(a - b).mean()  # noqa: E731
    for i in (0, 1):
        assert 0 < 2 * mean(tiled[i], whole[i]) < mean(tiled[i], whole[1 - i])
    auto = Runtime()
    assert not tile_vae(w.pipe, auto, (VAE_TILING_SIDE, VAE_TILING_SIDE))
    assert tile_vae(w.pipe, auto, (8, VAE_TILING_SIDE + 8)) and w.pipe.vae.use_tiling
    assert not tile_vae(w.pipe, Runtime(vae_tiling=False), (4096, 4096))


def test_batch_size_auto_measures_keeps_the_fastest_and_writes_no_probe_images(eager, tmp_path):
    unit, expected = eager
    w = worker(tmp_path, batch_size="auto")
    calls = []
    w.pipe.unet.register_forward_pre_hook(lambda _, args: calls.append(args[0].shape[0]))
    rows, batches = images(w, unit)
    probe = w.describe()["speed"]["batch_probe"]
    assert list(probe) == ["1", "2"]  # 4 is more than the unit's 3 images
    assert str(w.batch_size) == max(probe, key=probe.get)
    assert largest_difference(rows, expected) <= 1  # the output's 3 images, no probe image
    assert sum(b.images for b in batches) == 3
    # per size a warm-up and a timed call of 2 steps (at most PROBE_STEPS), at 2 passes an image
    assert calls[:8] == [2, 2, 2, 2, 4, 4, 4, 4]
    # its sizes are warm: the run's first batch at the chosen size is not a warm-up, the probe is
    assert not batches[0].warmup and w.describe()["speed"]["warmup_seconds"] > 0


def test_batch_size_auto_stops_at_out_of_memory(tmp_path, monkeypatch):
    unit = one_unit(
        Config("ddim", 2, 7.5, 32, 32, ""), texts=[f"{t} {i}" for i in range(3) for t in TEXTS]
    )
    w = worker(tmp_path, batch_size="auto")
    w.pipe = OutOfMemoryAbove(w.pipe, limit=2)
    # any rate counts as a gain: the probe goes on until memory runs out at 4
    monkeypatch.setattr("sdbatch.worker.PROBE_GAIN", 0.0)
    progress, _ = run(w, unit)
    assert w.pipe.sizes[:5] == [1, 1, 2, 2, 4]
    assert set(w.batch_probe) == {1, 2} and w.batch_size in (1, 2)
    assert sum(progress) == 9


def test_bf16_and_speed_options_end_to_end_are_recorded_in_run_json(
    tmp_path, prompt_file, ray_address
):
    data = job(
        prompt_file(TEXTS),
        sweep={"scheduler": ["euler"], "guidance_scale": [7.5], "images_per_prompt": 1},
        runtime={"dtype": "bf16", "batch_size": "auto", "attention": "eager", "shard_size": 3},
    )
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    summary = generate(load_spec(path), output=str(out), address=ray_address)
    assert summary.new_images == 3
    rows = pads.dataset(str(out / "images")).to_table().to_pylist()
    assert {r["dtype"] for r in rows} == {"bf16"}
    assert all(pixels(r["image"]["bytes"]).std() > 1 for r in rows)  # not blank or NaN-black
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["dtype"] == "bf16" and run_json["spec"]["runtime"]["attention"] == "eager"
    (entry,) = run_json["history"]
    speed = entry["workers"][0]["speed"]
    assert speed["attention"] == "eager" and speed["batch_size"] in (1, 2)
    assert speed["batch_probe"] and str(speed["batch_size"]) in speed["batch_probe"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("attention", "flash", "runtime.attention: must be 'sdpa' or 'eager', got 'flash'"),
        ("compile", "fast", "runtime.compile: must be true or false or 'default' or"),
        ("batch_size", "max", "runtime.batch_size: must be an integer or 'auto', got 'max'"),
        ("batch_size", 0, "runtime.batch_size: must be between 1 and 1,024 (or auto"),
        ("vae_tiling", "yes", "runtime.vae_tiling: must be true or false or 'auto', got 'yes'"),
        ("channels_last", 1, "runtime.channels_last: must be true or false or 'auto', got 1"),
    ],
)
def test_bad_runtime_options_are_refused_in_one_line(
    field, value, message, tmp_path, prompt_file, refused
):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job(prompt_file(TEXTS), runtime={field: value})))
    assert refused("generate", path).startswith(message)
