"""The worker in-process: schedulers, recorded parameters, batching, commits."""

from __future__ import annotations

import errno
import io
import itertools
import json

import diffusers
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from sdbatch.errors import StoreFailed
from sdbatch.evaluation.table import batch_frame, timing
from sdbatch.lease import acquire
from sdbatch.models import resolve_model
from sdbatch.output import Output
from sdbatch.records import UnitMarker
from sdbatch.schedulers import SCHEDULERS
from sdbatch.sweep import Config, plan_units
from sdbatch.worker import GenerationSetup, Worker

TINY = resolve_model("builtin:tiny")


def setup(output, batch_size=4) -> GenerationSetup:
    """What a driver gives its workers, the lease on `output` included."""
    out = Output(str(output))
    holder = acquire(out.fs, out.root)
    return GenerationSetup((TINY,), "fp32", str(output), holder.run_id, batch_size, 1)


def one_unit(config: Config, texts=("a red circle",), images_per_prompt=1, negatives=None):
    table = pd.DataFrame(
        {
            "prompt_id": [f"p{i}" for i in range(len(texts))],
            "prompt": list(texts),
            "negative_prompt": pd.Series(negatives or [None] * len(texts), dtype=object),
        }
    )
    (unit,) = plan_units(table, [config], images_per_prompt, seed=3, shard_size=len(texts))
    return unit


def run(worker: Worker, unit) -> tuple[list, dict]:
    """Each batch's image count, and the marker; the first item says the unit's turn began."""
    first, *items = worker.run(unit)
    assert first == 0
    return items[:-1], items[-1]


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    return Worker(setup(tmp_path_factory.mktemp("out")))


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_runs_without_reloading_weights(worker, name):
    unet = worker.pipe.unet
    weights = unet.conv_in.weight.data_ptr()
    progress, marker = run(worker, one_unit(Config(name, 2, 7.5, 32, 32, "")))
    assert progress == [1]
    assert type(worker.pipe.scheduler).__name__ == SCHEDULERS[name][0]
    assert worker.pipe.unet is unet and unet.conv_in.weight.data_ptr() == weights
    table = pq.read_table(Output(worker.setup.output).path(marker.file))
    assert table.column("scheduler").to_pylist() == [name]


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_unet_evaluations_per_image_are_counted_as_the_formula_says(worker, name, monkeypatch):
    """The cost a configuration records is what diffusers does: every UNet call counted, each
    image of its batch one evaluation (guidance doubles the batch rather than the calls)."""
    unet = worker.pipe.unet
    forward, evaluated = unet.forward, []

    def counting(sample, *args, **kwargs):
        evaluated.append(sample.shape[0])
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", counting)
    for steps, guidance in itertools.product((1, 2, 3), (1.0, 7.5)):
        config = Config(name, steps, guidance, 32, 32, "")
        evaluated.clear()
        run(worker, one_unit(config, texts=("a", "b"), images_per_prompt=1))
        assert sum(evaluated) / 2 == config.unet_evals_per_image, (steps, guidance)


def test_a_workers_first_batch_at_each_shape_is_warm_up_and_left_out_of_its_time(tmp_path):
    worker = Worker(setup(tmp_path, batch_size=2))
    ddim = Config("ddim", 2, 7.5, 32, 32, "")
    _, first = run(worker, one_unit(ddim, texts=("a", "b", "c"), images_per_prompt=2))
    texts = ("a", "b", "c", "d")  # two batches of 2
    # another scheduler at the same shape is warm; guidance 1 halves the UNet's batch, a new shape
    _, euler = run(worker, one_unit(Config("euler", 2, 7.5, 32, 32, ""), texts=texts))
    _, unguided = run(worker, one_unit(Config("ddim", 2, 1.0, 32, 32, ""), texts=texts))
    _, larger = run(worker, one_unit(Config("ddim", 2, 7.5, 64, 64, ""), texts=texts))
    assert [b.warmup for b in first.batches] == [True, False, False]
    assert [[b.warmup for b in m.batches] for m in (euler, unguided, larger)] == [
        [False, False], [True, False], [True, False],
    ]  # fmt: skip
    assert first.device == "cpu" and [b.images for b in first.batches] == [2, 2, 2]
    on_disk = UnitMarker.from_json((tmp_path / "_units" / f"{first.unit_id}.json").read_bytes())
    assert on_disk.batches == first.batches
    rows = pq.read_table(tmp_path / first.file).to_pylist()
    assert [r["warmup"] for r in rows] == [True, True, False, False, False, False]
    seconds = [b.seconds / b.images for b in first.batches]
    assert [r["generation_seconds"] for r in rows] == [s for s in seconds for _ in range(2)]

    timed = timing(batch_frame([first]))
    assert timed["seconds_per_image_median"] == pytest.approx(np.median(seconds[1:]))
    assert (timed["timed_batches"], timed["warmup_batches"]) == (2, 1)


@pytest.mark.parametrize(
    ("scheduler", "diffusers_class", "guidance"),
    [
        ("ddim", diffusers.DDIMScheduler, 7.5),
        ("euler_a", diffusers.EulerAncestralDiscreteScheduler, 4.0),  # stochastic sampler
        ("heun", diffusers.HeunDiscreteScheduler, 1.0),
    ],
)
def test_a_row_is_reproduced_by_plain_diffusers_from_its_recorded_parameters(
    worker, scheduler, diffusers_class, guidance
):
    unit = one_unit(Config(scheduler, 3, guidance, 32, 32, ""), negatives=["grainy"])
    _, marker = run(worker, unit)
    row = pq.read_table(Output(worker.setup.output).path(marker.file)).to_pylist()[0]

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(TINY.location)
    pipe.scheduler = diffusers_class.from_config(pipe.scheduler.config)
    expected = pipe(
        row["prompt"],
        negative_prompt=row["negative_prompt"],
        num_inference_steps=row["num_inference_steps"],
        guidance_scale=row["guidance_scale"],
        height=row["height"],
        width=row["width"],
        generator=torch.Generator().manual_seed(row["seed"]),
        output_type="np",
    ).images[0]
    expected = (expected * 255).round().astype(np.int16)
    assert row["negative_prompt"] == "grainy"
    assert np.abs(pixels(row["image"]["bytes"]) - expected).max() <= 1


def test_images_do_not_depend_on_batch_size(tmp_path):
    config = Config("euler_a", 3, 7.5, 32, 32, "")
    unit = one_unit(config, texts=("a cat", "a dog", "a cow"), images_per_prompt=2)
    tables = []
    for size in (1, 4):
        output = tmp_path / f"batch{size}"
        progress, marker = run(Worker(setup(output, batch_size=size)), unit)
        assert sum(progress) == 6 and max(progress) == size
        tables.append(pq.read_table(Output(str(output)).path(marker.file)).to_pylist())
    for one, four in zip(*tables, strict=True):
        assert (one["prompt_id"], one["sample_index"]) == (four["prompt_id"], four["sample_index"])
        assert np.abs(pixels(one["image"]["bytes"]) - pixels(four["image"]["bytes"])).max() <= 2
    # and different samples of one prompt really are different images
    assert not np.array_equal(
        pixels(tables[0][0]["image"]["bytes"]), pixels(tables[0][1]["image"]["bytes"])
    )


def test_a_unit_commits_its_file_then_its_marker(tmp_path):
    unit = one_unit(Config("ddim", 2, 7.5, 32, 32, ""), texts=("a", "b"), images_per_prompt=2)
    _, marker = run(Worker(setup(tmp_path)), unit)
    on_disk = json.loads((tmp_path / "_units" / f"{unit.unit_id}.json").read_text())
    assert on_disk == json.loads(marker.to_json())
    assert marker.images == 4 and list(marker.prompt_ids) == ["p0", "p1"]
    table = pq.read_table(tmp_path / marker.file)
    assert table.num_rows == 4
    assert not list((tmp_path / "_tmp").iterdir())  # nothing left half-written
    row = table.slice(0, 1).to_pylist()[0]
    assert row["image"]["path"] == f"{unit.config.config_id}/p0-0.png"
    assert Image.open(io.BytesIO(row["image"]["bytes"])).format == "PNG"
    assert row["generation_seconds"] > 0 and row["batch_size"] == 4
    # builtin:tiny has no safety checker: the flag is null, not False
    assert row["nsfw_flagged"] is None and marker.nsfw_flagged == 0


def test_commits_work_on_a_non_local_fsspec_filesystem():
    """Nothing in the output layer assumes a local disk: the same unit on fsspec's memory://."""
    unit = one_unit(Config("ddim", 2, 7.5, 32, 32, ""), texts=("a", "b"))
    _, marker = run(Worker(setup("memory://sdbatch-test/out")), unit)
    output = Output("memory://sdbatch-test/out")
    # workers rebuild the output from its location: it must name the same place
    assert output.location.startswith("memory://")
    assert Output(output.location).root == output.root
    assert output.done_units() == [marker]
    with output.fs.open(output.path(marker.file), "rb") as f:
        assert pq.read_table(f).num_rows == 2
    output.fs.pipe_file(output.path("images", "orphan.parquet"), b"never marked done")
    assert output.remove_orphans(output.done_units()) == 1
    assert output.fs.ls(output.path("images"), detail=False) == [output.path(marker.file)]


class OutOfMemoryAbove:
    """Wraps a pipeline: a call with more than `limit` prompts raises CUDA's out-of-memory error,
    as a GPU would for a batch too large; the others run for real."""

    def __init__(self, pipe, limit: int, error=torch.OutOfMemoryError):
        self.pipe, self.limit, self.error, self.sizes = pipe, limit, error, []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __setattr__(self, name, value):
        if name == "scheduler":
            self.pipe.scheduler = value
        else:
            super().__setattr__(name, value)

    def __call__(self, **kwargs):
        self.sizes.append(len(kwargs["prompt_embeds"]))
        if len(kwargs["prompt_embeds"]) > self.limit:
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.pipe(**kwargs)


def test_out_of_memory_halves_the_batch_and_the_images_stay_the_same(tmp_path):
    unit = one_unit(
        Config("ddim", 2, 7.5, 32, 32, ""), texts=("a cat", "a dog", "a cow"), images_per_prompt=2
    )
    whole = Worker(setup(tmp_path / "whole", batch_size=6))
    _, marker = run(whole, unit)
    expected = pq.read_table(tmp_path / "whole" / marker.file).to_pylist()

    worker = Worker(setup(tmp_path / "split", batch_size=6))
    worker.pipe = OutOfMemoryAbove(worker.pipe, limit=2)
    progress, marker = run(worker, unit)
    assert worker.pipe.sizes == [6, 3, 2, 2, 2]  # 6 and 3 fail; the worker then keeps 2
    assert progress == [2, 2, 2] and worker.batch_size == 2
    rows = pq.read_table(tmp_path / "split" / marker.file).to_pylist()
    assert [r["batch_size"] for r in rows] == [2] * 6
    assert [(r["prompt_id"], r["sample_index"], r["seed"]) for r in rows] == [
        (r["prompt_id"], r["sample_index"], r["seed"]) for r in expected
    ]
    for got, want in zip(rows, expected, strict=True):
        assert np.abs(pixels(got["image"]["bytes"]) - pixels(want["image"]["bytes"])).max() <= 2

    # the next unit starts at the lowered size, without failing first
    worker.pipe.sizes.clear()
    run(worker, one_unit(Config("ddim", 2, 7.5, 32, 32, ""), texts=("a hen", "a pig")))
    assert worker.pipe.sizes == [2]


def test_out_of_memory_at_batch_one_and_other_errors_are_not_split(tmp_path):
    unit = one_unit(Config("ddim", 2, 7.5, 32, 32, ""), texts=("a cat", "a dog"))
    worker = Worker(setup(tmp_path, batch_size=2))
    worker.pipe = OutOfMemoryAbove(worker.pipe, limit=0)
    with pytest.raises(torch.OutOfMemoryError):
        run(worker, unit)
    assert worker.pipe.sizes == [2, 1]
    worker.pipe = OutOfMemoryAbove(worker.pipe.pipe, limit=0, error=ValueError)
    with pytest.raises(ValueError):
        run(worker, unit)
    assert worker.pipe.sizes == [1]  # a ValueError is not memory: no smaller retry
    assert not (tmp_path / "_units").exists()  # nothing committed


def test_a_write_that_fails_half_way_leaves_nothing_a_reader_sees(tmp_path, monkeypatch):
    unit = one_unit(Config("ddim", 2, 7.5, 32, 32, ""), texts=("a", "b"))
    worker = Worker(setup(tmp_path))
    fs = worker._output.fs
    write = fs.pipe_file

    def dies_half_way(path, value, **kwargs):
        if path.endswith(".parquet"):
            write(path, value[: len(value) // 2])
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        return write(path, value, **kwargs)

    monkeypatch.setattr(fs, "pipe_file", dies_half_way)
    with pytest.raises(StoreFailed, match=r"refused a write to .*Disk quota exceeded"):
        run(worker, unit)
    monkeypatch.undo()
    assert not (tmp_path / "images").exists() or not list((tmp_path / "images").iterdir())
    assert not list((tmp_path / "_tmp").iterdir())
    assert Output(str(tmp_path)).done_units() == []
    # and the next attempt commits normally, leaving _tmp/ clean for readers
    _, marker = run(worker, unit)
    assert pq.read_table(tmp_path / marker.file).num_rows == 2
