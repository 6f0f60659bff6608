"""Benchmark: how fast a feature worker's decode threads turn PNG bytes into CLIP's pixel values.

On a GPU the model waits for this CPU work unless it is spread over the cores: a GPU feature
worker splits each batch among `decode_threads` threads (by default the node's cores per GPU).
This times that code path alone (`FeatureWorker`'s batches, no model called), for each thread
count side by side in one process, on synthetic 512x512 PNGs (a smooth gradient with noise, as
generated images compress) and CLIP ViT-L/14's preprocessing (bicubic resize of the short side to
224, center crop, normalisation; the builtin tiny CLIP's processor with those sizes). 0 threads
is the plain loop: each batch decoded when it is needed.

    python bench/eval_decode.py                   # 0, 1, 2 threads; 256 images, batch 32
    python bench/eval_decode.py --threads 0 --threads 4 --threads 8 --images 1024
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from sdbatch.builtin import builtin_path
from sdbatch.evaluation.worker import ExtractionSetup, FeatureWorker
from sdbatch.models import ModelSource

VIT_L_SIZE = 224


def pngs(count: int, size: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, size)[None, :, None]
    blobs = []
    for _ in range(count):
        pixels = (rng.random((size, size, 3)) * 40 + ramp).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        blobs.append(buffer.getvalue())
    return blobs


def vit_l_clip(folder: Path) -> ModelSource:
    """The builtin tiny CLIP, its image processor set to ViT-L/14's 224 px."""
    shutil.copytree(builtin_path("tiny-clip"), folder, dirs_exist_ok=True)
    config = folder / "processor_config.json"
    processor = json.loads(config.read_text())
    processor["image_processor"]["size"] = {"shortest_edge": VIT_L_SIZE}
    processor["image_processor"]["crop_size"] = {"height": VIT_L_SIZE, "width": VIT_L_SIZE}
    config.write_text(json.dumps(processor))
    return ModelSource(
        ref="bench", location=str(folder), revision=None, identity="bench-vit-l-processor"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, action="append", help="decode threads (repeat)")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="each count timed this often")
    args = parser.parse_args()
    counts = args.threads or [0, 1, 2]
    blobs = pngs(args.images, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        clip = vit_l_clip(Path(tmp) / "clip")
        setup = ExtractionSetup(clip=clip, extractor=None, batch_size=args.batch_size)
        workers = {n: FeatureWorker(dataclasses.replace(setup, decode_threads=n)) for n in counts}
        seconds: dict[int, list[float]] = {n: [] for n in counts}
        for _ in range(args.rounds):  # interleaved, so a change in the machine's load hits all
            for n, worker in workers.items():
                began = time.perf_counter()
                for batch, pixels in worker._prepared(blobs, None, embed=True):
                    assert pixels.shape == (len(batch), 3, VIT_L_SIZE, VIT_L_SIZE)
                seconds[n].append(time.perf_counter() - began)
    print(
        f"{args.images} PNGs of {args.size}x{args.size}, CLIP preprocessing to {VIT_L_SIZE} px, "
        f"batch {args.batch_size}, median of {args.rounds} rounds; {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )
    base = np.median(seconds[counts[0]])
    print(f"{'decode threads':>15}{'images/s':>10}{f'vs {counts[0]}':>8}")
    for n in counts:
        median = np.median(seconds[n])
        print(f"{n:>15}{args.images / median:10.1f}{base / median:7.2f}x")


if __name__ == "__main__":
    main()
