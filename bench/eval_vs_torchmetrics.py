"""Benchmark: the same images evaluated by `sdbatch eval` and by a plain torchmetrics loop.

The plain loop is what people write by hand: a torchmetrics CLIPScore, and a
FrechetInceptionDistance whose feature extractor is the same CLIP model's image embeddings, updated
batch by batch, one configuration after the other, in one process. sdbatch decodes and embeds on
Ray actors, embeds each generated image once for both metrics, writes per-unit shards and merges
their sufficient statistics; it also computes KID and bootstrap intervals, which the loop does not.

Both see identical images: made first by `sdbatch generate` (not timed), with the generated images
folder itself as FID's reference. The script checks that per-configuration CLIP score and FID agree
(torchmetrics clips the mean score at 0, sdbatch each image's, so a configuration with a negative
cosine is compared over its other images, untimed) and prints images/s for both, counting every
image that goes through CLIP (generated + reference).

    python bench/eval_vs_torchmetrics.py                       # 64 prompts x 2 configs x 2 images
    python bench/eval_vs_torchmetrics.py --prompts 256 --actors 4 --batch-size 64
    python bench/eval_vs_torchmetrics.py --threads 1           # on a machine busy with other work
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from sdbatch.builtin import builtin_path
from sdbatch.evaluation.run import evaluate
from sdbatch.evaluation.suite import parse_suite
from sdbatch.generation import generate
from sdbatch.spec import parse_spec

TEXTS = (Path(__file__).resolve().parents[1] / "jobs" / "demo-prompts.txt").read_text().splitlines()
CLIP_MODEL = "builtin:tiny-clip"
TOLERANCE = 1e-4  # relative


@dataclass
class Measured:
    """One side's timings (seconds) and its (clip_score, fid) per configuration."""

    whole: float  # models loaded and metrics computed; Ray's start excluded
    loop: float  # feature extraction and metric updates only
    scores: dict[str, tuple[float, float]]


def make_images(args, folder: Path) -> Path:
    """Generate the evaluated images with sdbatch itself; returns the output folder."""
    # Under 75 characters: the builtin CLIP has one token per character and a 77-token context,
    # and torchmetrics (slicing token ids) and sdbatch (keeping end-of-text) truncate differently.
    texts = [f"{TEXTS[i % len(TEXTS)]}, {i}" for i in range(args.prompts)]
    pq.write_table(pa.table({"prompt": texts}), folder / "prompts.parquet")
    spec = parse_spec(
        {
            "name": "bench-eval",
            "model": "builtin:tiny",
            "prompts": {"path": str(folder / "prompts.parquet")},
            "sweep": {
                "scheduler": ["euler"],
                "num_inference_steps": [args.steps],
                "guidance_scale": [1.0, 7.5],  # two configurations
                "images_per_prompt": args.per_prompt,
                "height": args.size,
                "width": args.size,
            },
            "runtime": {"batch_size": 8, "actors": args.actors},
        }
    )
    generate(spec, output=str(folder / "out"))
    return folder / "out"


def with_sdbatch(args, out: Path, cache: Path) -> tuple[Measured, float, pd.DataFrame]:
    """`sdbatch eval` on the connected Ray session, then once more (a resume: shards only).

    Returns the first call's measurement, the resume's seconds, and the per-image table.
    """
    suite = parse_suite(
        {
            "name": "bench-eval",
            "metrics": ["clip_score", "fid", "kid"],
            "clip": {"model": CLIP_MODEL},
            "fid": {"features": "clip"},
            "reference": {"images": str(out / "images")},
            "bootstrap": {"samples": args.bootstrap},
            "cache": str(cache),  # a fresh cache: the reference is extracted inside the timing
            "runtime": {"actors": args.actors, "batch_size": args.batch_size},
        }
    )
    began = time.perf_counter()
    summary = evaluate(str(out), suite)
    whole = time.perf_counter() - began
    began = time.perf_counter()
    evaluate(str(out), suite)
    resume = time.perf_counter() - began
    table = summary.configs.set_index("config_id")
    scores = {c: (row.clip_score, row.fid) for c, row in table.iterrows()}
    per_image = pd.read_parquet(out / "metrics" / "images.parquet")
    return Measured(whole, summary.extraction_seconds, scores), resume, per_image


def load_clip(device: str):
    """The builtin CLIP as torchmetrics' CLIPScore takes it: (model, CLIPProcessor)."""
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, CLIPProcessor

    path = builtin_path(CLIP_MODEL.removeprefix("builtin:"))

    class Clip(torch.nn.Module):
        """CLIPModel whose get_*_features return tensors, as torchmetrics expects (transformers 5
        returns ModelOutputs); called on uint8 N x 3 x H x W images it is FID's feature extractor.
        """

        def __init__(self):
            super().__init__()
            self.model = CLIPModel.from_pretrained(path, use_safetensors=True).to(device).eval()
            self.config = self.model.config
            # PIL image processing, as sdbatch's actors do: torchvision's resize differs slightly.
            self.processor = CLIPProcessor(
                image_processor=AutoImageProcessor.from_pretrained(path, backend="pil"),
                tokenizer=AutoTokenizer.from_pretrained(path),
            )

        def get_image_features(self, pixel_values):
            return _embedding(self.model.get_image_features(pixel_values=pixel_values))

        def get_text_features(self, input_ids, attention_mask=None):
            return _embedding(
                self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
            )

        def forward(self, images):
            pixels = self.processor(images=list(images.cpu()), return_tensors="pt")["pixel_values"]
            # float64 out: torchmetrics casts the FID it returns to the features' dtype.
            return self.get_image_features(pixels.to(device)).double()

    clip = Clip()
    return clip, clip.processor


def _embedding(output):
    return output if hasattr(output, "float") else output.pooler_output


def read_output(out: Path) -> pd.DataFrame:
    """Every generated image's PNG bytes and keys; the reference is the same files, all rows."""
    files = sorted((out / "images").glob("*.parquet"))  # in the order sdbatch lists them
    columns = ["image", "prompt", "config_id", "prompt_id", "sample_index"]
    table = pa.concat_tables([pq.read_table(f, columns=columns) for f in files])
    frame = table.drop_columns("image").to_pandas()
    frame["png"] = [cell["bytes"] for cell in table.column("image").to_pylist()]
    return frame


def batches(frame: pd.DataFrame, size: int, device: str):
    """(rows, uint8 N x 3 x H x W tensor) batch by batch, decoded as they are needed."""
    import torch

    for start in range(0, len(frame), size):
        rows = frame.iloc[start : start + size]
        pixels = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in rows["png"]]
        yield rows, torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).to(device)


def plain_loop(args, out: Path) -> Measured:
    """CLIPScore + FID updated batch by batch, the reference first, then each configuration."""
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.multimodal.clip_score import CLIPScore

    began = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    clip, processor = load_clip(device)
    score = CLIPScore(model_name_or_path=lambda: (clip, processor)).to(device)
    frechet = FrechetInceptionDistance(feature=clip, reset_real_features=False).to(device)
    started = time.perf_counter()
    frame = read_output(out)
    scores = {}
    with torch.no_grad():
        for _, images in batches(frame, args.batch_size, device):
            frechet.update(images, real=True)
        for config_id, mine in frame.groupby("config_id"):
            for rows, images in batches(mine, args.batch_size, device):
                score.update(list(images), list(rows["prompt"]))
                frechet.update(images, real=False)
            scores[config_id] = (float(score.compute()), float(frechet.compute()))
            score.reset()
            frechet.reset()  # keeps the reference's statistics
    end = time.perf_counter()
    return Measured(end - began, end - started, scores)


def clip_score_without(args, out: Path, clipped: pd.DataFrame) -> dict[str, float]:
    """Untimed: per configuration, torchmetrics' CLIPScore over the images sdbatch did not clip
    to 0, times their share of the configuration's images.

    torchmetrics clips the mean score at 0, sdbatch each image's (Hessel et al.'s definition):
    leaving out exactly the images with a negative cosine makes the two the same number again.
    """
    import torch
    from torchmetrics.multimodal.clip_score import CLIPScore

    clip, processor = load_clip("cpu")
    score = CLIPScore(model_name_or_path=lambda: (clip, processor))
    frame = read_output(out)
    frame = frame[frame["config_id"].isin(clipped["config_id"])]
    keys = ["config_id", "prompt_id", "sample_index"]
    kept = frame.merge(clipped[keys], on=keys, how="left", indicator=True)["_merge"] != "both"
    scores = {}
    with torch.no_grad():
        for config_id, mine in frame[kept.to_numpy()].groupby("config_id"):
            for rows, images in batches(mine, args.batch_size, "cpu"):
                score.update(list(images), list(rows["prompt"]))
            share = len(mine) / (frame["config_id"] == config_id).sum()
            scores[config_id] = float(score.compute()) * share
            score.reset()
    return scores


def report(
    args,
    ours: Measured,
    resume: float,
    plain: Measured,
    per_image: pd.DataFrame,
    without: dict[str, float],
) -> None:
    import torch

    n = 2 * len(per_image)  # every generated image, and each again as a reference image
    print(
        f"\n{len(per_image)} generated + {len(per_image)} reference images "
        f"({len(ours.scores)} configs, {args.size}x{args.size}), CLIP {CLIP_MODEL}, "
        f"batch {args.batch_size}; {args.actors} sdbatch actors on {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads here"
    )
    print(f"{'':26}{'whole run s':>12}{'images/s':>10}{'loop s':>10}{'images/s':>10}")
    for name, m in (("plain torchmetrics loop", plain), ("sdbatch eval", ours)):
        print(f"{name:26}{m.whole:12.2f}{n / m.whole:10.1f}{m.loop:10.2f}{n / m.loop:10.1f}")
    print(f"{'ratio sdbatch/plain':26}{'':12}{plain.whole / ours.whole:10.2f}", end="")
    print(f"{'':10}{plain.loop / ours.loop:10.2f}")
    print(f"{'sdbatch eval, resumed':26}{resume:12.2f}  (shards re-read, metrics recomputed)")
    print("whole run: models loaded (sdbatch: actors started), metrics computed; not Ray's start")
    print("loop: plain = decode, embed, update, compute; sdbatch = its actors' extraction")

    # Configurations with a negative cosine are compared with torchmetrics' score over the other
    # images (`clip_score_without`), the timed loop's own score shown beside it.
    clipped = per_image[per_image["clip_score"] == 0].groupby("config_id").size()
    clip_diffs, fid_diffs = [], []
    print()
    for config_id, (clip_score, fid) in ours.scores.items():
        plain_clip, plain_fid = plain.scores[config_id]
        expected = without.get(config_id, plain_clip)
        clip_diffs.append(abs(clip_score / expected - 1))
        fid_diffs.append(abs(fid / plain_fid - 1))
        print(f"  {config_id}: clip_score {clip_score:.6f} vs {expected:.6f}", end="")
        if config_id in clipped:
            print(f" ({clipped[config_id]} images < 0 left out; all: {plain_clip:.6f})", end="")
        print(f", fid {fid:.6g} vs {plain_fid:.6g}")
    clip_diff, fid_diff = max(clip_diffs), max(fid_diffs)
    print(f"max relative difference sdbatch vs torchmetrics: clip_score {clip_diff:.2e}, ", end="")
    print(f"fid {fid_diff:.2e}")
    ok = max(clip_diff, fid_diff) < TOLERANCE
    print(f"agreement: {'OK' if ok else 'MISMATCH'} (tolerance {TOLERANCE:g} relative)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--per-prompt", type=int, default=2, help="images per prompt and config")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument(
        "--actors",
        type=lambda v: v if v == "auto" else int(v),
        default=2,
        help="CPU actors (with GPUs, auto: one per GPU)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--bootstrap", type=int, default=200, help="sdbatch's bootstrap samples")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads of this process: the plain loop, and sdbatch's metric math (default: "
        "torch's own); on a busy machine 1 avoids threads waiting on descheduled siblings",
    )
    args = parser.parse_args()

    # Imported before any timing: each side would pay them once per process.
    import ray
    import torch
    import transformers  # noqa: F401

    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        # Ray starts before the timing; generate and evaluate reuse a connected session.
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
        try:
            out = make_images(args, Path(tmp))
            ours, resume, per_image = with_sdbatch(args, out, Path(tmp) / "cache")
        finally:
            ray.shutdown()
        plain = plain_loop(args, out)
        clipped = per_image[per_image["clip_score"] == 0]
        without = clip_score_without(args, out, clipped) if len(clipped) else {}
    report(args, ours, resume, plain, per_image, without)


if __name__ == "__main__":
    main()
