"""Benchmark: the same images evaluated by `sdbatch eval` and by a plain torchmetrics loop.

The plain loop is what people write by hand: a torchmetrics CLIPScore, and a
FrechetInceptionDistance whose feature extractor is the same CLIP model's image embeddings, updated
batch by batch, one configuration after the other, in one process. sdbatch decodes and embeds on
Ray actors, embeds each generated image once for both metrics, writes per-unit shards and merges
their sufficient statistics. By default it computes what the loop computes, CLIP score and FID per
configuration; `--kid` and `--bootstrap N` add work the loop does not do (KID, and intervals from N
bootstrap replicates).

Both see identical images: made first by `sdbatch generate` (not timed), with the generated images
folder itself as FID's reference. Each measurement runs in a process of its own, after torch,
transformers and Ray are imported (each side's own library, torchmetrics or sdbatch's evaluation,
is imported inside its timing; the parent also times each process whole): the plain loop, sdbatch
as this checkout has it ("after"), and sdbatch as the git revision `--before` had it (unpacked with
`git archive`), in turn, `--repeats` times; medians are printed, with each round's ratio to the
plain loop. Both sides use the same cores: the plain loop `--threads` torch threads; sdbatch with
`--actors 1` (its default) on a machine without a GPU extracts in its own process with `--threads`
threads, as `sdbatch eval` without a cluster does, and Ray is not started; with more actors (or a
GPU), Ray is started before the timing with `--threads` CPUs, which the actors share (one thread
each when there are as many actors as threads). The driver's metric math gets `--threads` threads.
The script checks that per-configuration CLIP score and FID agree (torchmetrics clips the mean
score at 0, sdbatch each image's, so a configuration with a negative cosine is compared over its
other images, untimed), that before and after wrote the same configs.parquet and
replicates.parquet, and prints images/s, counting every image that goes through CLIP (generated +
reference).

    python bench/eval_vs_torchmetrics.py                       # 512 prompts: 2048 + 2048 images
    python bench/eval_vs_torchmetrics.py --prompts 64 --repeats 1
    python bench/eval_vs_torchmetrics.py --threads 1          # one core each
    python bench/eval_vs_torchmetrics.py --actors 2           # two CPU actors on a Ray instance
    python bench/eval_vs_torchmetrics.py --kid --bootstrap 200     # sdbatch does more
    python bench/eval_vs_torchmetrics.py --before none         # this checkout only
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TEXTS = (ROOT / "jobs" / "demo-prompts.txt").read_text().splitlines()
CLIP_MODEL = "builtin:tiny-clip"
TOLERANCE = 1e-4  # relative
PLAIN, AFTER = "plain torchmetrics loop", "sdbatch eval, after"
# The last commit before evaluation's start-up, decoding and driver-side math were sped up.
BEFORE = "761fe10"
# Measured, so they differ between two runs on the same images.
TIMED_COLUMNS = ("seconds_per_image", "timed_batches", "warmup_batches")


@dataclass
class Measured:
    """One run's timings (seconds) and its (clip_score, fid) per configuration."""

    whole: float  # its library imported, models loaded, metrics computed; Ray's start excluded
    loop: float  # feature extraction and metric updates only
    scores: dict[str, tuple[float, float]]
    resume: float | None = None  # sdbatch: the same call again, shards only
    process: float | None = None  # the measuring process, from its start to its exit


def make_images(args, folder: Path) -> None:
    """Generate the evaluated images with sdbatch itself, into FOLDER/out."""
    from sdbatch.generation import generate
    from sdbatch.spec import parse_spec

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


def eval_suite(args, out: Path, cache: Path):
    """The suite both sdbatch revisions run: what the plain loop computes, or more."""
    from sdbatch.evaluation.suite import parse_suite

    return parse_suite(
        {
            "name": "bench-eval",
            "metrics": ["clip_score", "fid", *(["kid"] if args.kid else [])],
            "clip": {"model": CLIP_MODEL},
            "fid": {"features": "clip"},
            "reference": {"images": str(out / "images")},
            "bootstrap": {"samples": args.bootstrap},
            "cache": str(cache),  # a fresh cache: the reference is extracted inside the timing
            "runtime": {"actors": args.actors, "batch_size": args.batch_size},
        }
    )


def with_sdbatch(out: Path, suite, imported: float) -> Measured:
    """`sdbatch eval` with a fresh cache and no shards, then once more (a resume: shards only);
    `imported`: the seconds importing sdbatch's evaluation took, counted in the whole."""
    from sdbatch.evaluation.run import evaluate

    began = time.perf_counter()
    summary = evaluate(str(out), suite)
    whole = imported + time.perf_counter() - began
    began = time.perf_counter()
    evaluate(str(out), suite)
    resume = time.perf_counter() - began
    table = summary.configs.set_index("config_id")
    scores = {c: (row.clip_score, row.fid) for c, row in table.iterrows()}
    return Measured(whole, summary.extraction_seconds, scores, resume)


def load_clip(device: str):
    """The builtin CLIP as torchmetrics' CLIPScore takes it: (model, CLIPProcessor)."""
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, CLIPProcessor

    from sdbatch.builtin import builtin_path

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

    # Its library is imported inside the timing, as sdbatch's is: importing torchmetrics also
    # imports much of what importing CLIPModel would (torch._dynamo, torch.distributed.tensor).
    began = time.perf_counter()
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.multimodal.clip_score import CLIPScore

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


def measure(args) -> None:
    """One measurement in this process (`--measure`): its Measured as JSON in `--result`, and
    sdbatch's tables beside it."""
    # Imported before any timing, as both sides would be in a script of their own.
    import ray
    import torch
    import transformers  # noqa: F401

    torch.set_num_threads(args.threads)
    data, result = Path(args.data), Path(args.result)
    out = data / "out"
    if args.measure == "plain":
        measured = plain_loop(args, out)
    else:
        # No shards and no cached reference: every image is extracted, as by the plain loop.
        cache = data / f"cache-{result.stem}"
        shutil.rmtree(out / "metrics", ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
        began = time.perf_counter()
        import sdbatch.evaluation.run  # noqa: F401  # its library, timed as torchmetrics' is

        imported = time.perf_counter() - began
        try:
            from sdbatch.evaluation.run import extracts_here
        except ImportError:  # `--before` a revision that always extracted on actors

            def extracts_here(suite, address):
                return False

        suite = eval_suite(args, out, cache)
        if extracts_here(suite, None):
            measured = with_sdbatch(out, suite, imported)
        else:
            # Ray starts before the timing, with the cores the plain loop's threads have.
            ray.init(
                address="local",
                num_cpus=args.threads,
                include_dashboard=False,
                logging_level="ERROR",
            )
            try:
                measured = with_sdbatch(out, suite, imported)
            finally:
                ray.shutdown()
        for name in ("configs", "replicates", "images"):
            shutil.copy(out / "metrics" / f"{name}.parquet", f"{result}.{name}.parquet")
    result.write_text(json.dumps(asdict(measured)))


def run_side(args, side: str, source: Path, data: Path, result: Path) -> Measured:
    """`measure` in a fresh process that imports sdbatch from `source` (its Ray actors too)."""
    command = [
        sys.executable,
        __file__,
        "--measure",
        "plain" if side == PLAIN else "sdbatch",
    ]
    command += ["--data", str(data), "--result", str(result)]
    for name in ("actors", "batch_size", "bootstrap", "threads"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    command += ["--kid"] if args.kid else []
    env = {**os.environ, "PYTHONPATH": str(source)}
    began = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    process = time.perf_counter() - began
    return Measured(**{**json.loads(result.read_text()), "process": process})


def report(args, sides: dict[str, list[Measured]], generated: int) -> None:
    """Medians over the rounds, and each side's median ratio to the plain loop in its round."""
    n = 2 * generated  # every generated image, and each again as a reference image
    plain = sides[PLAIN]
    load = os.getloadavg()[0]
    print(
        f"\n{generated} generated + {generated} reference images ({len(plain[0].scores)} configs, "
        f"{args.size}x{args.size}), CLIP {CLIP_MODEL}, batch {args.batch_size}, median of "
        f"{args.repeats} rounds; plain loop: {args.threads} torch threads; sdbatch: "
        f"{args.actors} actors sharing {args.threads} CPUs; {os.cpu_count()} CPUs, load average "
        f"{load:.1f} at the end"
    )
    extra = ["KID"] * args.kid + [f"{args.bootstrap} bootstrap replicates"] * (args.bootstrap > 0)
    print(f"both compute CLIP score and FID; sdbatch also: {', '.join(extra) or 'nothing'}")
    print(
        f"{'':30}{'whole s':>9}{'images/s':>10}{'vs plain':>10}{'process s':>10}{'vs plain':>10}"
        f"{'loop s':>9}{'images/s':>10}{'vs plain':>10}{'resume s':>10}"
    )

    def ratio(field: str, runs: list[Measured]) -> float:
        pairs = zip(plain, runs, strict=True)
        return np.median([getattr(p, field) / getattr(m, field) for p, m in pairs])

    for name, runs in sides.items():
        whole = np.median([m.whole for m in runs])
        process = np.median([m.process for m in runs])
        loop = np.median([m.loop for m in runs])
        resume = "" if runs[0].resume is None else f"{np.median([m.resume for m in runs]):10.2f}"
        print(
            f"{name:30}{whole:9.2f}{n / whole:10.1f}{ratio('whole', runs):9.2f}x"
            f"{process:10.2f}{ratio('process', runs):9.2f}x"
            f"{loop:9.2f}{n / loop:10.1f}{ratio('loop', runs):9.2f}x{resume}"
        )
    before = [name for name in sides if name.startswith("sdbatch eval, before")]
    if before:
        ratios = [b.whole / a.whole for b, a in zip(sides[before[0]], sides[AFTER], strict=True)]
        print(f"{'after vs before':30}{'':19}{np.median(ratios):9.2f}x (whole run, per round)")
    print(
        "whole: its library imported (torchmetrics; sdbatch's evaluation), models loaded "
        "(sdbatch: in its process, or actors started), metrics computed; not Ray's start"
    )
    print("process: the measuring process from start to exit (Ray's start and the resume too)")
    print("loop: plain = decode, embed, update, compute; sdbatch = its actors' extraction")
    print("resume: the same sdbatch eval again (shards re-read, metrics recomputed)")


def check_agreement(args, out: Path, ours: Measured, plain: Measured, images: Path) -> bool:
    """Per-configuration CLIP score and FID of sdbatch against the plain loop's; printed."""
    # Configurations with a negative cosine are compared with torchmetrics' score over the other
    # images (`clip_score_without`), the timed loop's own score shown beside it.
    per_image = pd.read_parquet(images)
    clipped = per_image[per_image["clip_score"] == 0]
    without = clip_score_without(args, out, clipped) if len(clipped) else {}
    counts = clipped.groupby("config_id").size()
    clip_diffs, fid_diffs = [], []
    print()
    for config_id, (clip_score, fid) in ours.scores.items():
        plain_clip, plain_fid = plain.scores[config_id]
        expected = without.get(config_id, plain_clip)
        clip_diffs.append(abs(clip_score / expected - 1))
        fid_diffs.append(abs(fid / plain_fid - 1))
        print(f"  {config_id}: clip_score {clip_score:.6f} vs {expected:.6f}", end="")
        if config_id in counts:
            print(f" ({counts[config_id]} images < 0 left out; all: {plain_clip:.6f})", end="")
        print(f", fid {fid:.6g} vs {plain_fid:.6g}")
    clip_diff, fid_diff = max(clip_diffs), max(fid_diffs)
    print(f"max relative difference sdbatch vs torchmetrics: clip_score {clip_diff:.2e}, ", end="")
    print(f"fid {fid_diff:.2e}")
    ok = max(clip_diff, fid_diff) < TOLERANCE
    print(f"agreement: {'OK' if ok else 'MISMATCH'} (tolerance {TOLERANCE:g} relative)")
    return ok


def same_tables(before: Path, after: Path) -> bool:
    """Whether before and after wrote the same configs and replicates, exactly; printed."""
    same = True
    for name in ("configs", "replicates", "images"):
        a = pd.read_parquet(f"{before}.{name}.parquet")
        b = pd.read_parquet(f"{after}.{name}.parquet")
        equal = a.columns.equals(b.columns) and a.equals(b)
        same &= equal
        print(f"{name}.parquet before vs after: {'identical' if equal else 'DIFFERENT'}")
    return same


def unpack(revision: str, folder: Path) -> Path:
    """The sdbatch package as git `revision` had it, unpacked under `folder`; returns `folder`."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision, "sdbatch"], check=True, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--per-prompt", type=int, default=2, help="images per prompt and config")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument(
        "--actors",
        type=lambda v: v if v == "auto" else int(v),
        default=1,
        help="sdbatch's CPU actors (1: extraction in its own process, without a GPU; with GPUs, "
        "auto: one per GPU)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--bootstrap", type=int, default=0, help="sdbatch's bootstrap replicates (0: no intervals)"
    )
    parser.add_argument("--kid", action="store_true", help="sdbatch computes KID too")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count(),
        help="CPUs each side gets: the plain loop's torch threads, the CPUs sdbatch's Ray "
        "instance shares among its actors, and sdbatch's metric math threads",
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every side")
    parser.add_argument(
        "--before",
        default=BEFORE,
        help="a git revision of sdbatch to measure beside this checkout ('none': skip it)",
    )
    parser.add_argument("--measure", choices=["plain", "sdbatch"], help=argparse.SUPPRESS)
    parser.add_argument(
        "--data",
        help="a folder to generate the images into, or to reuse them from when it has them "
        "(default: a temporary folder)",
    )
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data or tmp)
        data.mkdir(parents=True, exist_ok=True)
        out = data / "out"
        if not (out / "run.json").exists():
            import ray

            ray.init(
                address="local",
                num_cpus=os.cpu_count(),
                include_dashboard=False,
                logging_level="ERROR",
            )
            try:
                make_images(args, data)
            finally:
                ray.shutdown()
        sources = {PLAIN: ROOT}
        if args.before != "none":
            sources[f"sdbatch eval, before ({args.before})"] = unpack(args.before, data / "before")
        sources[AFTER] = ROOT
        sides: dict[str, list[Measured]] = {name: [] for name in sources}
        for round_ in range(args.repeats):
            for i, (name, source) in enumerate(sources.items()):
                result = data / f"{i}-{round_}.json"
                sides[name].append(run_side(args, name, source, data, result))
                print(f"round {round_ + 1}, {name}: {sides[name][-1].whole:.2f} s", flush=True)
        generated = len(pd.read_parquet(data / f"{len(sources) - 1}-0.json.images.parquet"))
        report(args, sides, generated)
        after = data / f"{len(sources) - 1}-0.json"
        ok = check_agreement(
            args,
            out,
            sides[AFTER][0],
            sides[PLAIN][0],
            Path(f"{after}.images.parquet"),
        )
        if args.before != "none":
            ok &= same_tables(data / "1-0.json", after)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
