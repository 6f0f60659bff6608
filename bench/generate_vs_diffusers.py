"""Benchmark: the same images made by `sdbatch generate` and by a plain diffusers loop.

The plain loop is what people write by hand: load the pipeline, call `pipe()` once per image with
that image's own seeded generator, save each PNG to a file. sdbatch batches images of one
configuration, encodes PNGs while the next batch denoises, and writes Parquet.

Both make identical images (same seeds, same scheduler); the script checks that and prints images/s
for both, whole-run (model load and, for sdbatch, Ray start included) and generation-only. Both get
the same cores (`--threads`, default all): the loop as many torch threads, sdbatch's local Ray as
many CPUs, which its actors share (one actor: as many threads; `--actors 2 --threads 2`: one
thread each), as in bench/eval_vs_torchmetrics.py. Where the loop runs faster on fewer threads
than it has cores (a small model on a CPU), `--plain-threads` gives it those.

    python bench/generate_vs_diffusers.py                      # builtin:tiny, 128x128, CPU
    python bench/generate_vs_diffusers.py --threads 2 --actors 2 --plain-threads 1 \
        --batch-size 32 --images 768                           # the README's last row
    python bench/generate_vs_diffusers.py --model /path/to/sd15 --size 512 --images 256
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
from PIL import Image

from sdbatch.generation import generate
from sdbatch.models import load_pipeline, resolve_model
from sdbatch.prompts import derive_prompt_ids
from sdbatch.schedulers import make_scheduler
from sdbatch.spec import parse_spec
from sdbatch.sweep import image_seed

TEXTS = (Path(__file__).resolve().parents[1] / "jobs" / "demo-prompts.txt").read_text().splitlines()


def plain_loop(args, texts: list[str], folder: Path) -> tuple[float, float, dict]:
    """`pipe()` on `args.batch` images at a time (1: once per image, as people write it), each
    image with its own seeded generator, each PNG written to a file; returns (wall s, generation
    s, pixels)."""
    import torch

    if args.threads:  # None (bench/gpu_check.py): torch's default
        torch.set_num_threads(args.threads)
    began = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = load_pipeline(resolve_model(args.model), "fp16" if device == "cuda" else "fp32", device)
    pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    started = time.perf_counter()
    work = [
        (prompt_id, sample, text)
        for prompt_id, text in zip(derive_prompt_ids(texts), texts, strict=True)
        for sample in range(args.per_prompt)
    ]
    images = {}
    for start in range(0, len(work), args.batch):
        batch = work[start : start + args.batch]
        made = pipe(
            [text for *_, text in batch],
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            height=args.size,
            width=args.size,
            generator=[
                torch.Generator().manual_seed(image_seed(args.seed, p, s)) for p, s, _ in batch
            ],
        ).images
        for (prompt_id, sample, _), image in zip(batch, made, strict=True):
            image.save(folder / f"{prompt_id}-{sample}.png", compress_level=1)
            images[(prompt_id, sample)] = np.asarray(image, dtype=np.int16)
    end = time.perf_counter()
    return end - began, end - started, images


def with_sdbatch(args, texts: list[str], folder: Path) -> tuple[float, float, dict]:
    """`sdbatch generate` on a local Ray instance; returns (wall s, generation s, pixels)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": texts}), folder / "prompts.parquet")
    spec = parse_spec(
        {
            "name": "bench",
            "model": args.model,
            "prompts": {"path": str(folder / "prompts.parquet")},
            "sweep": {
                "scheduler": [args.scheduler],
                "num_inference_steps": [args.steps],
                "guidance_scale": [args.guidance],
                "images_per_prompt": args.per_prompt,
                "height": args.size,
                "width": args.size,
            },
            "seed": args.seed,
            "runtime": args.runtime,
        }
    )
    summary = generate(spec, output=str(folder / "out"))
    rows = pads.dataset(str(folder / "out" / "images")).to_table().to_pylist()
    images = {
        (r["prompt_id"], r["sample_index"]): np.asarray(
            Image.open(io.BytesIO(r["image"]["bytes"])), dtype=np.int16
        )
        for r in rows
    }
    run = json.loads((folder / "out" / "run.json").read_text())
    threads = [w["torch_threads"] for w in run["history"][-1]["workers"]]
    if args.threads and sum(threads) != args.threads:
        raise SystemExit(f"sdbatch's workers ran {threads} torch threads, the loop {args.threads}")
    return summary.seconds, summary.generation_seconds, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:tiny")
    parser.add_argument("--images", type=int, default=64, help="total images (2 per prompt)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--scheduler", default="euler")
    parser.add_argument(
        "--batch-size",
        type=lambda v: v if v == "auto" else int(v),
        default=8,
        help="sdbatch's batch size, or auto (it probes for the fastest, inside the whole run)",
    )
    parser.add_argument("--actors", default="auto", type=lambda v: v if v == "auto" else int(v))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores per side")
    parser.add_argument(
        "--plain-threads",
        type=int,
        help="the plain loop's torch threads, when fewer serve it better (default: --threads)",
    )
    args = parser.parse_args()
    args.per_prompt = 2
    args.batch = 1
    args.runtime = {"batch_size": args.batch_size, "actors": args.actors}
    # The CPUs of the local Ray instance sdbatch starts, which its actors share.
    os.environ["RAY_OVERRIDE_RESOURCES"] = json.dumps({"CPU": args.threads})
    texts = [f"{TEXTS[i % len(TEXTS)]}, variation {i}" for i in range(args.images // 2)]
    n = len(texts) * args.per_prompt

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "plain").mkdir()
        plain_args = argparse.Namespace(
            **{**vars(args), "threads": args.plain_threads or args.threads}
        )
        plain = plain_loop(plain_args, texts, Path(tmp) / "plain")
        ours = with_sdbatch(args, texts, Path(tmp))

    same = max(np.abs(plain[2][k] - ours[2][k]).max() for k in plain[2])
    print(f"\n{n} images, {args.size}x{args.size}, {args.steps} steps {args.scheduler}, ", end="")
    print(f"guidance {args.guidance}, model {args.model}; max pixel difference {same}/255")
    print(
        f"plain loop: {args.plain_threads or args.threads} torch threads; sdbatch: "
        f"{args.threads} CPUs, actors {args.actors}, batch size {args.batch_size}; "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )
    print(f"{'':24}{'whole run s':>12}{'images/s':>10}{'gen-only s':>12}{'images/s':>10}")
    for name, (wall, gen, _) in (("plain diffusers loop", plain), ("sdbatch", ours)):
        print(f"{name:24}{wall:12.1f}{n / wall:10.2f}{gen:12.1f}{n / gen:10.2f}")
    print(
        f"{'ratio sdbatch/plain':24}{'':12}{plain[0] / ours[0]:10.2f}"
        f"{'':12}{plain[1] / ours[1]:10.2f}"
    )


if __name__ == "__main__":
    main()
