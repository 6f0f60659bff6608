"""The prepared GPU check: generation and evaluation throughput on one GPU, in one table.

A GPU is lent to this project only at times, for minutes, so everything it should measure runs from
this one command, inside about 8 minutes on an H100/H200-class GPU:

- an SD-1.5-shaped and an SDXL-shaped pipeline, built from their published configurations with
  random weights (the same arithmetic as the real ones; no download), saved and loaded back through
  `from_pretrained` as sdbatch loads any local model;
- for each: a plain diffusers loop at batch 1 (one `pipe()` call per image, PNG saved), plain
  diffusers at the best of a few batch sizes, `sdbatch generate` with its defaults, and with every
  `runtime` option this version of sdbatch has for speed (the options it lacks are named, not run);
- images/s, ratio to the plain loop, % of the GPU's arithmetic limit (FLOPs per image counted by
  torch's FlopCounterMode on the pipeline itself), GPU busy % after warm-up and peak GPU memory
  (sampled by NVML every 0.1 s); for sdbatch also images/s after warm-up (each shape's first
  call, which compiles with `compile`) and the warm-up's seconds;
- evaluation throughput: `sdbatch evaluate` over generated 512 px images with a CLIP ViT-L/14-shaped
  model and torchmetrics' Inception (random weights), images/s.

    bash bench/gpu_check.sh            # on a GPU machine; then it runs the GPU-only tests
    python bench/gpu_check.py --smoke  # on CPU in under a minute: tiny shapes, the same code path

--smoke builds tiny pipelines of the same classes, so CI runs every line of this script (the
compile row with TORCH_COMPILE_DISABLE=1: CPU compiling takes minutes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from generate_vs_diffusers import TEXTS, plain_loop, with_sdbatch

from sdbatch.builtin import builtin_path
from sdbatch.spec import Runtime

# Dense fp16/bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s; others are measured.
PEAK_TFLOPS = {"H100": 989, "H200": 989, "H800": 989, "A100": 312, "L40S": 362, "L4": 121}
# The runtime options that trade nothing for speed, by the name they have (or will have) in
# sdbatch's `runtime:`; the table runs those this version has and names the others. The defaults'
# row already has channels_last, SDPA attention and VAE slicing (all "auto": on for CUDA).
SPEED_OPTIONS = {
    "compile": {"compile": True},
    "batch_size auto": {"batch_size": "auto"},
}


@dataclasses.dataclass(frozen=True)
class Shape:
    """A pipeline's architecture and the workload measured on it."""

    name: str
    size: int
    steps: int
    images: int  # per sdbatch row; the plain loop at batch 1 makes a quarter
    batches: tuple[int, ...]  # tried for "plain diffusers, best batch"


def shapes(smoke: bool, images: int) -> list[Shape]:
    if smoke:
        return [Shape("sd15", 64, 2, 8, (2, 4)), Shape("sdxl", 64, 2, 4, (2,))]
    return [Shape("sd15", 512, 50, images, (8, 16, 32)), Shape("sdxl", 1024, 50, 16, (4, 8))]


def unet_config(shape: str, smoke: bool) -> dict:
    if shape == "sd15":
        config = {"cross_attention_dim": 768, "sample_size": 64, "attention_head_dim": 8}
    else:  # SDXL base 1.0's UNet
        config = {
            "sample_size": 128,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [320, 640, 1280],
            "transformer_layers_per_block": [1, 2, 10],
            "attention_head_dim": [5, 10, 20],
            "cross_attention_dim": 2048,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        }
    if smoke:  # the same block types, a few channels wide
        blocks = len(config.get("down_block_types", [0, 0, 0, 0]))
        config.update(
            block_out_channels=[32] * blocks,
            norm_num_groups=8,
            layers_per_block=1,
            attention_head_dim=4,
            transformer_layers_per_block=1,
            cross_attention_dim=32 if shape == "sd15" else 64,
        )
        if shape == "sdxl":
            config.update(addition_time_embed_dim=8, projection_class_embeddings_input_dim=80)
    return config


def text_config(hidden: int, layers: int, heads: int, act: str, smoke: bool) -> dict:
    if smoke:  # SDXL's UNet takes both encoders' states side by side: 32 + 32 wide
        hidden, layers, heads = 32, 2, 2
    return {
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "projection_dim": hidden,
        "hidden_act": act,
        "vocab_size": 49408,
        "max_position_embeddings": 77,
    }


def build_pipeline(shape: str, folder: Path, smoke: bool, device: str) -> Path:
    """A pipeline of `shape` with random weights, saved as safetensors like a downloaded one."""
    import diffusers
    import torch
    import transformers

    tokenizer = transformers.CLIPTokenizerFast.from_pretrained(builtin_path("tiny") / "tokenizer")
    vae = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2}
    if smoke:
        vae = {"block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 8}
    vae["down_block_types"] = ["DownEncoderBlock2D"] * 4
    vae["up_block_types"] = ["UpDecoderBlock2D"] * 4
    # Random initialisation of billions of weights is a minute on CPU and a second on the GPU.
    with torch.device(device):
        parts = {
            "unet": diffusers.UNet2DConditionModel(**unet_config(shape, smoke)),
            "vae": diffusers.AutoencoderKL(**vae),
            "text_encoder": transformers.CLIPTextModel(
                transformers.CLIPTextConfig(**text_config(768, 12, 12, "quick_gelu", smoke))
            ),
        }
        if shape == "sdxl":
            parts["text_encoder_2"] = transformers.CLIPTextModelWithProjection(
                transformers.CLIPTextConfig(**text_config(1280, 32, 20, "gelu", smoke))
            )
            parts["tokenizer_2"] = tokenizer
    scheduler = diffusers.EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    if shape == "sd15":
        pipe = diffusers.StableDiffusionPipeline(
            **parts, tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
    else:
        pipe = diffusers.StableDiffusionXLPipeline(
            **parts, tokenizer=tokenizer, scheduler=scheduler
        )
    dtype = torch.float32 if smoke else torch.float16
    pipe.to(dtype=dtype).save_pretrained(folder, safe_serialization=True)
    del pipe, parts
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


class GpuSampler:
    """GPU utilisation and memory in use, sampled by NVML every 0.1 s while a phase runs."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int, int]] = []  # (time, busy %, bytes used)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._nvml = pynvml
        except Exception:  # no NVIDIA driver: CPU smoke runs
            self._nvml = None

    def __enter__(self) -> GpuSampler:
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _sample(self) -> None:
        nvml = self._nvml
        while not self._stop.wait(0.1):
            busy = nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu
            used = nvml.nvmlDeviceGetMemoryInfo(self._handle).used
            self.samples.append((time.perf_counter(), busy, used))

    def busy_after_warmup(self) -> float | None:
        """Busy % from 2 s after the GPU first got busy (loading and compiling excluded) to the
        last busy sample (the driver's final writes excluded)."""
        busy = [t for t, b, _ in self.samples if b > 50]
        if not busy:
            return None
        window = [b for t, b, _ in self.samples if busy[0] + 2 <= t <= busy[-1]]
        return sum(window) / len(window) if window else None

    def peak_gib(self, baseline: int) -> float | None:
        return max((u for *_, u in self.samples), default=baseline) / 2**30 - baseline / 2**30


def memory_in_use() -> int:
    sampler = GpuSampler()
    if sampler._nvml is None:
        return 0
    return sampler._nvml.nvmlDeviceGetMemoryInfo(sampler._handle).used


def flops_per_image(folder: Path, shape: Shape, device: str) -> float:
    """FLOPs of one image at `shape.steps` steps with guidance: the pipeline counted at 1 and 2
    steps, so the per-step part (the UNet at batch 2) and the rest (text encoders, VAE) separate."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sdbatch.models import load_pipeline, resolve_model

    pipe = load_pipeline(resolve_model(str(folder)), "fp32" if device == "cpu" else "fp16", device)
    counted = []
    for steps in (1, 2):
        with FlopCounterMode(display=False) as counter:
            pipe("a photo", num_inference_steps=steps, guidance_scale=7.5,
                 height=shape.size, width=shape.size, output_type="np")  # fmt: skip
        counted.append(counter.get_total_flops())
    del pipe
    if device == "cuda":
        torch.cuda.empty_cache()
    per_step = counted[1] - counted[0]
    return counted[0] + (shape.steps - 1) * per_step


def peak_tflops(device: str) -> tuple[float, str]:
    """The GPU's dense fp16 peak by its name, else a measured fp32 matrix product's rate."""
    import torch

    if device == "cuda":
        name = torch.cuda.get_device_name()
        for model, peak in PEAK_TFLOPS.items():
            if model in name:
                return peak, f"{name}: {peak:g} dense fp16 TFLOP/s (datasheet)"
    a = torch.randn(1024, 1024, device=device)
    a @ a
    began = time.perf_counter()
    for _ in range(10):
        a @ a
    if device == "cuda":
        torch.cuda.synchronize()
    rate = 10 * 2 * 1024**3 / (time.perf_counter() - began) / 1e12
    return rate, f"{device}: {rate:.3g} TFLOP/s measured (1024² fp32 products)"


def measure(way, shape: Shape, folder: Path, work: Path, images: int, name: str, **options):
    """(generation seconds, images, sdbatch's warm-up columns) of `way` (plain_loop or
    with_sdbatch) on `images` prompts."""
    texts = [f"{TEXTS[i % len(TEXTS)]}, variation {i}" for i in range(images)]
    args = argparse.Namespace(
        model=str(folder), scheduler="euler", steps=shape.steps, guidance=7.5, size=shape.size,
        seed=0, per_prompt=1, threads=None, **options,
    )  # fmt: skip
    out = work / f"{shape.name}-{name}"
    out.mkdir()
    _, generation, _ = way(args, texts, out)
    return generation, len(texts), warmup_columns(out / "out") if way is with_sdbatch else {}


def warmup_columns(output: Path) -> dict:
    """Images/s of the batches after warm-up (each shape's first call: compiling, with compile),
    and the warm-up batches' seconds, from the rows sdbatch wrote."""
    import pyarrow.dataset as pads

    rows = pads.dataset(str(output / "images")).to_table(["warmup", "generation_seconds"])
    warm = [s for w, s in zip(*rows.to_pydict().values(), strict=True) if not w]
    cold = sum(rows["generation_seconds"].to_pylist()) - sum(warm)
    return {
        "images/s after warm-up": round(len(warm) / sum(warm), 3) if warm else None,
        "warm-up s": round(cold, 1),
    }


def row(name, images, seconds, warmup, plain_rate, flops, peak, sampler, baseline):
    rate = images / seconds
    busy = sampler.busy_after_warmup()
    memory = sampler.peak_gib(baseline) if sampler.samples else None
    return {
        "pipeline": name,
        "images": images,
        "images/s": round(rate, 3),
        "x plain": round(rate / plain_rate, 2) if plain_rate else 1.0,
        "% of limit": round(100 * rate * flops / (peak * 1e12), 1),
        "GPU busy %": None if busy is None else round(busy),
        "peak GiB": None if memory is None else round(memory, 1),
        "images/s after warm-up": None,
        "warm-up s": None,
    } | warmup


def measure_generation(args, shape: Shape, work: Path, device: str, peak: float) -> list[dict]:
    folder = build_pipeline(shape.name, work / f"model-{shape.name}", args.smoke, device)
    flops = flops_per_image(folder, shape, device)
    print(f"{shape.name}: {flops / 1e12:.2f} TFLOP per image", flush=True)
    baseline = memory_in_use()
    at = (shape, folder, work)

    def sampled(fn, *fn_args, **fn_options):
        with GpuSampler() as sampler:
            measured = fn(*fn_args, **fn_options)
        return (*measured, sampler)

    def add(name, seconds, images, warmup, sampler):
        rows.append(row(name, images, seconds, warmup, rows[0]["images/s"] if rows else None,
                        flops, peak, sampler, baseline))  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)

    rows: list[dict] = []
    plain = max(2, shape.images // 4)
    add("plain diffusers, batch 1", *sampled(measure, plain_loop, *at, plain, "plain-1", batch=1))
    probes = {
        b: sampled(measure, plain_loop, *at, 2 * b, f"plain-{b}", batch=b) for b in shape.batches
    }
    best = max(probes, key=lambda b: probes[b][1] / probes[b][0])
    add(f"plain diffusers, batch {best}", *probes[best])
    add("sdbatch, defaults", *sampled(measure, with_sdbatch, *at, shape.images, "sd", runtime={}))
    fields = {f.name for f in dataclasses.fields(Runtime)}
    for option, runtime in SPEED_OPTIONS.items():
        if set(runtime) <= fields:
            measured = sampled(measure, with_sdbatch, *at, shape.images, option, runtime=runtime)
            add(f"sdbatch, {option}", *measured)
        else:
            print(f"sdbatch, {option}: not in this version's runtime options", flush=True)
    shutil.rmtree(folder)
    return rows


def clip_l14(folder: Path, smoke: bool) -> str:
    """CLIP ViT-L/14-shaped, random weights, with CLIP's processor: a local model folder."""
    import transformers

    if smoke:
        return "builtin:tiny-clip"
    config = transformers.CLIPConfig(
        text_config=text_config(768, 12, 12, "quick_gelu", False),
        vision_config={
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "patch_size": 14,
            "image_size": 224,
            "projection_dim": 768,
        },
        projection_dim=768,
    )
    transformers.CLIPModel(config).save_pretrained(folder)
    processor = transformers.CLIPProcessor.from_pretrained(builtin_path("tiny-clip"))
    processor.image_processor.size = {"shortest_edge": 224}
    processor.image_processor.crop_size = {"height": 224, "width": 224}
    processor.save_pretrained(folder)
    return str(folder)


def random_inception_weights() -> bool:
    """torch-fidelity's InceptionV3 with random weights where FID looks for the real file, so the
    Inception path runs (at the real network's cost) without a download. False without it."""
    import torch

    try:
        from torch_fidelity import feature_extractor_inceptionv3 as inception
    except ImportError:
        return False
    target = Path(torch.hub.get_dir(), "checkpoints", "weights-inception-2015-12-05-6726825d.pth")
    if target.exists():
        return True
    skip = inception.FeatureExtractorInceptionV3.load_state_dict
    inception.FeatureExtractorInceptionV3.load_state_dict = lambda *a, **k: None
    inception.load_state_dict_from_url = lambda *a, **k: {}
    try:
        model = inception.FeatureExtractorInceptionV3("random", ["2048"])
    finally:
        inception.FeatureExtractorInceptionV3.load_state_dict = skip
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), target)
    return True


def measure_evaluation(args, work: Path) -> dict:
    """`sdbatch evaluate` over builtin:tiny's images at 512 px (cheap to make, as costly to
    decode and embed as any 512 px image): images/s of the whole call and of extraction."""
    import yaml

    from sdbatch.evaluation.run import compute_reference, evaluate
    from sdbatch.evaluation.suite import load_suite

    images, size = (16, 64) if args.smoke else (args.eval_images, 512)
    texts = [f"{TEXTS[i % len(TEXTS)]}, variation {i}" for i in range(images)]
    gen_args = argparse.Namespace(
        model="builtin:tiny", scheduler="euler", steps=1, guidance=7.5, size=size, seed=0,
        per_prompt=1, threads=None, runtime={"batch_size": 64},
    )  # fmt: skip
    (work / "eval").mkdir()
    with_sdbatch(gen_args, texts, work / "eval")
    inception = random_inception_weights()
    suite = {
        "name": "gpu-check",
        "clip": {"model": clip_l14(work / "clip-l14", args.smoke)},
        "metrics": ["clip_score", "fid"],
        "fid": {"features": "inception" if inception else "clip"},
        "reference": {"images": str(work / "eval" / "out" / "images")},
        "cache": str(work / "cache"),
    }
    (work / "suite.yaml").write_text(yaml.safe_dump(suite))
    suite = load_suite(work / "suite.yaml")
    # The reference (the same images) first, so the timed call extracts generated images only.
    began = time.perf_counter()
    compute_reference(suite)
    reference_seconds = time.perf_counter() - began
    with GpuSampler() as sampler:
        summary = evaluate(str(work / "eval" / "out"), suite)
    busy = sampler.busy_after_warmup()
    return {
        "evaluation": f"CLIP {'tiny' if args.smoke else 'ViT-L/14'}-shaped + "
        f"{'Inception' if inception else 'CLIP features'}, {size} px PNG",
        "images": images,
        "images/s (reference call)": round(images / reference_seconds, 1),
        "images/s (evaluate call)": round(images / summary.seconds, 1),
        "images/s (extraction)": round(images / summary.extraction_seconds, 1),
        "GPU busy %": None if busy is None else round(busy),
    }


def table(rows: list[dict]) -> str:
    """Rows of dicts as a Markdown table."""
    names = list(rows[0])
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for r in rows:
        lines.append("| " + " | ".join("" if r[n] is None else str(r[n]) for n in names) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, under a minute")
    parser.add_argument("--images", type=int, default=64, help="SD-1.5 images per sdbatch row")
    parser.add_argument("--eval-images", type=int, default=4096)
    parser.add_argument("--only", choices=("sd15", "sdxl", "eval"), action="append")
    parser.add_argument("--json", type=Path, help="also write the tables here")
    args = parser.parse_args()
    import diffusers
    import torch
    import transformers

    from sdbatch.distribute import session

    # Casting random models to fp16 and saving them warns of things no measurement depends on.
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu" and not args.smoke:
        sys.exit("bench/gpu_check.py: no CUDA GPU here; --smoke runs the tiny shapes on CPU")
    if args.smoke:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        # The compile row's code path without inductor's minutes of CPU compiling (set before
        # Ray starts, so its workers inherit it); tests/test_runtime_options.py compiles for real.
        os.environ["TORCH_COMPILE_DISABLE"] = "1"
    peak, peak_note = peak_tflops(device)
    began = time.perf_counter()
    results: dict = {"device": peak_note, "generation": {}, "evaluation": None}
    # One Ray instance for every sdbatch call, started once.
    with tempfile.TemporaryDirectory() as tmp, session(None):
        work = Path(tmp)
        for shape in shapes(args.smoke, args.images):
            if args.only and shape.name not in args.only:
                continue
            shape_work = work / shape.name
            shape_work.mkdir()
            results["generation"][shape.name] = measure_generation(
                args, shape, shape_work, device, peak
            )
        if not args.only or "eval" in args.only:
            results["evaluation"] = measure_evaluation(args, work)
    print(f"\n{peak_note}; {time.perf_counter() - began:.0f} s in all")
    for name, rows in results["generation"].items():
        shape = next(s for s in shapes(args.smoke, args.images) if s.name == name)
        print(f"\n{name}-shaped, {shape.size}², {shape.steps} steps, guidance 7.5, euler, "
              f"{'fp32' if device == 'cpu' else 'fp16'}\n{table(rows)}")  # fmt: skip
    if results["evaluation"]:
        print(f"\n{table([results['evaluation']])}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
