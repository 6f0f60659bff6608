"""What only a CUDA GPU can show: a real out-of-memory error splitting the batch, fp16 images
that do not depend on the batch they were made in, and each actor's GPU busy % in run.json.
Marked `gpu` (skipped elsewhere); bench/gpu_check.sh runs them on a lent GPU, with the Inception
FID test of test_eval.py."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.dataset as pads
import pytest
from conftest import job
from PIL import Image

from sdbatch.generation import generate
from sdbatch.spec import parse_spec

pytestmark = pytest.mark.gpu


def images(out) -> dict[tuple[str, int, str], np.ndarray]:
    rows = pads.dataset(str(out / "images")).to_table().to_pylist()
    return {
        (r["prompt_id"], r["sample_index"], r["config_id"]): np.asarray(
            Image.open(io.BytesIO(r["image"]["bytes"])), dtype=np.int16
        )
        for r in rows
    }


def test_a_real_out_of_memory_error_halves_the_batch(prompt_file, tmp_path, ray_address):
    """Another process holds all but 3 GiB of the card, as on a shared GPU: a batch of 64 at
    1024 px cannot fit (the VAE alone needs about 2 GiB per activation), so the worker halves
    it until it fits, and every image is still made once."""
    import pyarrow.parquet as pq
    import torch

    free, _ = torch.cuda.mem_get_info()
    held = torch.empty(free - 3 * 2**30, dtype=torch.uint8, device="cuda")
    sweep = {"scheduler": ["euler"], "guidance_scale": [7.5], "images_per_prompt": 16,
             "height": 1024, "width": 1024}  # fmt: skip
    spec = job(prompt_file(texts=["a red circle", "a blue square", "a green star", "a cat"]),
               sweep=sweep, runtime={"batch_size": 64, "shard_size": 4})  # fmt: skip
    summary = generate(parse_spec(spec), output=str(tmp_path / "out"), address=ray_address)
    del held
    rows = pq.read_table(tmp_path / "out" / "images").to_pandas()
    assert not summary.failed
    assert len(rows) == 64 and not rows.duplicated(["prompt_id", "sample_index"]).any()
    assert rows["batch_size"].max() < 64


def test_fp16_images_do_not_depend_on_the_batch(prompt_file, tmp_path, ray_address):
    """Stated tolerance: fp16 kernels pick other algorithms for other batch sizes, so pixels
    may differ by a few levels, never more than 4/255 and 0.5/255 on average; the same batch
    size gives the same bytes."""
    prompts = prompt_file()
    made = {}
    for name, batch in (("b1", 1), ("b8", 8), ("b8-again", 8)):
        spec = job(prompts, runtime={"batch_size": batch, "dtype": "fp16"},
                   sweep={"height": 256, "width": 256})  # fmt: skip
        generate(parse_spec(spec), output=str(tmp_path / name), address=ray_address)
        made[name] = images(tmp_path / name)
    assert made["b8"].keys() == made["b1"].keys()
    for key, pixels in made["b8"].items():
        assert np.array_equal(pixels, made["b8-again"][key])
        difference = np.abs(pixels - made["b1"][key])
        assert difference.max() <= 4 and difference.mean() <= 0.5, key


def test_each_actor_records_its_gpu_busy_percent(prompt_file, tmp_path, ray_address):
    """Busy % sampled by NVML while the actor generated, with its peak memory, in run.json."""
    pytest.importorskip("pynvml")
    spec = job(prompt_file(), runtime={"batch_size": 4, "dtype": "fp16"},
               sweep={"height": 512, "width": 512, "num_inference_steps": [30]})  # fmt: skip
    generate(parse_spec(spec), output=str(tmp_path / "out"), address=ray_address)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    (worker,) = run["history"][-1]["workers"]
    assert worker["device"] != "cpu"
    assert worker["gpu"]["samples"] > 0 and 0 < worker["gpu"]["busy_percent"] <= 100
    assert worker["gpu"]["peak_memory_gib"] > 0
