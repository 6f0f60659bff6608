"""The worker: a loaded pipeline that turns work units into committed Parquet files.

A worker holds one model at a time and keeps it while its units come (distribute hands units out
by model); another model's unit frees it and loads that one. LoRA adapters are loaded into the
model once and switched by weight (`set_adapters`, `disable_lora`): a unit never reloads base
weights, and switching does not grow memory (loading adapters over and over does:
huggingface/diffusers#8532). Each task's pipeline is built once per model from the loaded
components (`AutoPipelineForImage2Image.from_pipe`, `AutoPipelineForInpainting.from_pipe`: the same
module objects, no weights loaded); switching task or strength loads nothing.

Outpainting is inpainting on the extended canvas: the source at (left, top), the new border
edge-replicated (each border pixel repeats the nearest source pixel, so the canvas holds no color
the scene does not) and masked white. It runs at strength 1: the border is generated from noise
(a 9-channel model sees it masked out), so the fill is the canvas's content, never a start that
biases the result.

A plain class, so tests run it in-process; distribute.py wraps it, unchanged, in a Ray actor.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import io
import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from sdbatch import speed
from sdbatch.adapters import AdapterSource
from sdbatch.errors import first_line
from sdbatch.gpu_usage import GpuUsage
from sdbatch.image_rows import ImageRow, image_table
from sdbatch.models import ModelSource, load_pipeline
from sdbatch.output import Output
from sdbatch.records import BatchTiming, UnitMarker, library_versions
from sdbatch.schedulers import guidance_passes, make_scheduler
from sdbatch.sources import pixels as png_pixels
from sdbatch.spec import Expansion, Runtime
from sdbatch.sweep import WorkUnit, image_seed
from sdbatch.worker_logs import quiet_libraries

log = logging.getLogger("sdbatch")
# diffusers' pipelines make transformers warn at import about optional vision backends, before a
# worker can send its warnings to its log file (quiet_libraries): set in the actor's environment.
ACTOR_ENV = {"TRANSFORMERS_VERBOSITY": "error"}
# batch_size: auto tries a larger batch while it gives this many times the best images/s so far,
# at most this many denoising steps per probe call.
PROBE_GAIN = 1.05
PROBE_STEPS = 10
# The tasks whose pipeline is derived from the loaded one's components, and the class that does it.
DERIVED = {
    "img2img": "AutoPipelineForImage2Image",
    "inpaint": "AutoPipelineForInpainting",
    "outpaint": "AutoPipelineForInpainting",
}

# What `encode_prompt` returns, in its order (SD's pipelines: the first two).
EMBEDDINGS = (
    "prompt_embeds",
    "negative_prompt_embeds",
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
)
# Shards x adapters x tasks whose prompt embeddings a worker keeps: units come shard-major, so
# one shard's configurations follow each other; a few MB each.
EMBEDDING_CACHE = 8


@dataclass(frozen=True)
class GenerationSetup:
    """What every generation worker of a run loads; the driver resolves it once."""

    models: tuple[ModelSource, ...]
    dtype: str  # fp16, bf16 or fp32
    output: str  # an Output.location
    run_id: str  # the lease's: a unit commits only while its run holds the output
    batch_size: int | str  # or "auto": measured on the first unit (Worker.choose_batch_size)
    png_compress_level: int
    threads: int | None = None  # torch CPU threads; None keeps torch's default
    log_dir: str | None = None  # for the libraries' warnings (quiet_libraries); None: as they are
    adapters: tuple[AdapterSource, ...] = ()
    # The model (its reference) this worker loads first; None: the first of `models`.
    # distribute sets it per actor (`affinity`), so that actors start on different models.
    affinity: str | None = None
    # The spec's runtime: its speed options (compile, channels_last, attention, VAE) apply here.
    runtime: Runtime = field(default_factory=Runtime)


def encode_png(pixels: np.ndarray, level: int) -> bytes:
    """Lossless PNG of an HxWx3 uint8 array."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=level)
    return buffer.getvalue()


class Worker:
    """Loads a model once and keeps it; `run` generates a work unit and commits it."""

    # Units an actor holds at once (distribute): one generating, the next already there, so
    # the accelerator never waits for the driver between units, and a commit overlaps the
    # next unit's generation.
    UNITS_IN_FLIGHT = 2

    def __init__(self, setup: GenerationSetup):
        import torch

        if setup.threads:
            torch.set_num_threads(setup.threads)
        if setup.log_dir:
            quiet_libraries(setup.log_dir)
        self.setup = setup
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self._sources = {m.ref: m for m in setup.models}
        # peft names adapters as module keys, which a reference's dots and slashes cannot be.
        self._adapter_names = {a.ref: (f"lora{i}", a) for i, a in enumerate(setup.adapters)}
        self.model_loads = 0
        self.adapter_loads = 0
        self.model: str | None = None  # the loaded model's reference
        self.pipe: Any = None
        self._use_model(setup.affinity or setup.models[0].ref)
        self._output = Output(setup.output)
        # Lowered, for the rest of this worker's life, when a batch runs out of memory; None
        # until `choose_batch_size` has measured it (batch_size: auto).
        self.batch_size: int | None = None if setup.batch_size == "auto" else setup.batch_size
        self.batch_probe: dict[int, float] = {}  # batch size -> images/s, as measured
        # Of the warm-up batches (compiling, with compile) and of the batch probe.
        self.warmup_seconds = 0.0
        self._tiled: set[tuple[int, int]] = set()  # sizes whose VAE decode was tiled
        # The UNet input shapes this worker has run: the first call at each one is warm-up.
        self._shapes: set[tuple[str | None, str, int, int, int]] = set()
        # zlib releases the GIL, so PNG encoding of one batch overlaps the next batch's denoising.
        self._encoder = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
        self._usage = GpuUsage.of_this_process() if self.device == "cuda" else None
        # Held by the unit that generates (see `run`); the other one in flight waits or commits.
        self._turn = threading.Lock()

    def describe(self) -> dict[str, Any]:
        """Where this worker runs, for the run's provenance."""
        import torch

        return {
            "host": socket.gethostname(),
            "device": self.device_name(),
            "torch_threads": torch.get_num_threads(),
            "versions": library_versions(),
            "model_loads": self.model_loads,
            "adapter_loads": self.adapter_loads,
            "gpu": self._gpu_summary(),
            "speed": {
                **self.speed,
                "vae_tiled_sizes": [list(size) for size in sorted(self._tiled)],
                "batch_size": self.batch_size,
                # JSON keys are strings: the sizes as text
                "batch_probe": {str(b): round(r, 4) for b, r in self.batch_probe.items()},
                "warmup_seconds": round(self.warmup_seconds, 3),
            },
        }

    def _gpu_summary(self) -> dict[str, Any] | None:
        """Busy % while generating and peak memory; None on CPU."""
        import torch

        if self.device != "cuda":
            return None
        usage = self._usage.summary() if self._usage else {"busy_percent": None, "samples": 0}
        return {**usage, "peak_memory_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}

    def device_name(self) -> str:
        """The accelerator's name (``NVIDIA H100 80GB HBM3``), or ``cpu``."""
        import torch

        return torch.cuda.get_device_name() if self.device == "cuda" else "cpu"

    def run(self, unit: WorkUnit) -> Iterator[int | UnitMarker]:
        """Generate `unit`, yielding 0 when it starts and each batch's image count; commit it
        and yield its marker.

        Units generate one at a time, in turn; a unit's commit (PNG encoding it waits for, the
        Parquet write, the upload, the marker) runs after its turn, while the next unit
        generates: distribute hands an actor its next unit before this one ends.
        """
        with self._turn:
            yield 0  # the unit's turn began: the driver's stall clock starts for it now
            rows, timings = yield from self._make(unit)
        yield self._commit(unit, rows, timings)

    def _make(self, unit: WorkUnit) -> Iterator[int]:
        """Generate `unit` batch by batch, yielding each batch's image count; returns its rows
        (their PNGs still encoding) and batch timings."""
        # 1. switch model (only if it is another), adapter and scheduler
        self._use_model(unit.config.model or self.model)
        self._use_adapter(unit.config.lora, unit.config.lora_scale)
        name = unit.config.scheduler
        if name not in self._schedulers:
            self._schedulers[name] = make_scheduler(name, self._scheduler_config)
        self._pipeline(unit.config.task).scheduler = self._schedulers[name]

        # 2. generate batch by batch; every image has its own seed, whatever batch it lands in
        if self.batch_size is None:
            self.batch_size = self.choose_batch_size(unit)
        images = [
            (p, s) for p in range(len(unit.prompt_ids)) for s in range(unit.images_per_prompt)
        ]
        config = unit.config
        rows: list[tuple[ImageRow, Future[bytes]]] = []
        timings: list[BatchTiming] = []
        start = 0
        while start < len(images):
            batch = images[start : start + self.batch_size]
            seeds = [image_seed(unit.seed, unit.prompt_ids[p], s) for p, s in batch]
            passes = guidance_passes(config.guidance_scale)
            shape = (self.model, config.task, self._padded(len(batch)) * passes, *config.size)
            # Not a switch of scheduler: it builds no tensors (measured no slower). The first
            # call at a new shape is left out too: on a GPU it selects kernels and grows the
            # memory pool; leaving out one call per shape costs one sample, counting it a bias.
            warmup = shape not in self._shapes
            began = time.perf_counter()
            try:
                pixels, flags = self._generate(unit, [p for p, _ in batch], seeds)
            except Exception as e:
                if len(batch) == 1 or not _out_of_memory(e):
                    raise
                self._shrink_batch(len(batch), e)
                continue
            wall = time.perf_counter() - began
            if self._usage is not None:
                self._usage.batch(began, began + wall, warmup)
            self._shapes.add(shape)
            self.warmup_seconds += wall if warmup else 0.0
            timings.append(BatchTiming(len(batch), wall, warmup))
            start += len(batch)
            seconds = wall / len(batch)
            level = self.setup.png_compress_level
            rows += [
                (
                    self._row(unit, p, s, seed, flag, len(batch), seconds, warmup),
                    self._encoder.submit(encode_png, px, level),
                )
                for (p, s), seed, flag, px in zip(batch, seeds, flags, pixels, strict=True)
            ]
            yield len(batch)
        return rows, timings

    def _commit(
        self,
        unit: WorkUnit,
        rows: list[tuple[ImageRow, Future[bytes]]],
        timings: list[BatchTiming],
    ) -> UnitMarker:
        """Write the unit's images, then its done marker (the commit); returns the marker."""
        for row, png in rows:
            row.image["bytes"] = png.result()
        marker = UnitMarker(
            unit_id=unit.unit_id,
            config_id=unit.config.config_id,
            prompt_ids=unit.prompt_ids,
            images=len(rows),
            generation_seconds=sum(r.generation_seconds for r, _ in rows),
            nsfw_flagged=sum(bool(r.nsfw_flagged) for r, _ in rows),
            run=unit.run,
            batches=tuple(timings),
            device=self.device_name(),
        )
        table = image_table([r for r, _ in rows])
        return self._output.commit_unit(table, marker, self.setup.run_id)

    def _use_model(self, ref: str) -> None:
        """Load model `ref`, unless it is the one loaded; the previous one is freed first, as
        two may not fit at once."""
        import torch

        if ref == self.model:
            return
        self.pipe, self.model = None, None  # none is loaded until this load succeeds
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
        _return_freed_memory()
        self.pipe = load_pipeline(self._sources[ref], self.setup.dtype, self.device)
        self.speed = speed.apply(self.pipe, self.setup.runtime, self.device)
        self.model = ref
        self.model_loads += 1
        # Every scheduler is built from the model's own config, never from the last one used.
        self._scheduler_config = self.pipe.scheduler.config
        self._schedulers: dict[str, Any] = {}
        self._adapters_loaded: set[str] = set()
        self._pipes: dict[str, Any] = {}
        # Prompt embeddings of the last shards, by what determines them (`_prompt_inputs`).
        self._embedded: OrderedDict[tuple, dict[str, Any]] = OrderedDict()

    def _pipeline(self, task: str) -> Any:
        """The loaded model's pipeline for `task`, built once from its components."""
        # text2img and depth2img run the pipeline as loaded (check_task saw its class).
        if task not in DERIVED:
            return self.pipe
        if task not in self._pipes:
            import diffusers

            pipe = getattr(diffusers, DERIVED[task]).from_pipe(self.pipe)
            pipe.set_progress_bar_config(disable=True)
            self._pipes[task] = pipe
        return self._pipes[task]

    def _use_adapter(self, ref: str | None, scale: float | None) -> None:
        """Apply adapter `ref` at `scale`, loading it into this model the first time; None: the
        model as it is."""
        if ref is None:
            if self._adapters_loaded:
                self.pipe.disable_lora()
            return
        name, source = self._adapter_names[ref]
        if name not in self._adapters_loaded:
            self.pipe.load_lora_weights(
                source.location,
                weight_name=source.weight_name,
                revision=source.revision,
                adapter_name=name,
                use_safetensors=True,
            )
            self._adapters_loaded.add(name)
            self.adapter_loads += 1
        # set_adapters does not undo disable_lora: enabled again first.
        self.pipe.enable_lora()
        self.pipe.set_adapters(name, adapter_weights=scale)

    def _shrink_batch(self, size: int, error: Exception) -> None:
        """Halve the batch after running out of memory; this worker keeps the smaller size."""
        import torch

        self.batch_size = (size + 1) // 2
        log.warning(
            "out of memory with a batch of %d (%s); retrying with %d",
            size, first_line(error),
            self.batch_size,
        )  # fmt: skip
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def _generate(
        self, unit: WorkUnit, prompts: list[int], seeds: list[int]
    ) -> tuple[np.ndarray, list[bool | None]]:
        """The batch's pixels, and per image whether the model's safety checker flagged it.

        The checker runs for every output type but latents. A flagged image is kept as the
        model's checker made it (diffusers returns it black): sdbatch records the flag and
        changes no pixel, so the dataset shows what the model, as shipped, gives its users.
        """
        import torch

        config = unit.config
        count = len(seeds)
        # A short batch is padded to the full size (its last image repeated, then dropped), so
        # a compiled model meets one shape per configuration instead of compiling again.
        pad = self._padded(count) - count
        prompts, seeds = prompts + prompts[-1:] * pad, seeds + seeds[-1:] * pad
        if speed.tile_vae(self.pipe, self.setup.runtime, config.size):
            self._tiled.add(config.size)
        result = self._pipeline(config.task)(
            **self._prompt_inputs(unit, prompts),
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale,
            # CPU generators give the same noise on any device, so a seed means one image.
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            output_type="pt",
            **_task_inputs(unit, prompts),
        )
        # diffusers' own rounding (numpy_to_pil), on the device: a quarter of the bytes to copy.
        pixels = (result.images * 255).round().clamp(0, 255).to(torch.uint8)
        # None when the model has no checker; pipelines that never have one (SDXL) lack the field.
        flags = getattr(result, "nsfw_content_detected", None)
        flags = [None] * count if flags is None else [bool(f) for f in flags[:count]]
        return pixels[:count].permute(0, 2, 3, 1).cpu().numpy(), flags

    def _padded(self, size: int) -> int:
        """The batch size a call of `size` images runs at: the full batch size when compiled."""
        if self.speed["compile"] and self.batch_size:
            return max(size, self.batch_size)
        return size

    def choose_batch_size(self, unit: WorkUnit) -> int:
        """The batch size of the most images/s on `unit`'s configuration (batch_size: auto).

        Sizes 1, 2, 4, ... up to the unit's images are run, each once to warm up (kernel
        selection, compiling) and once timed, until one runs out of memory or is less than
        PROBE_GAIN faster than the best so far. The probe's images are thrown away, and it runs
        at most PROBE_STEPS steps: the UNet's share of the time, not the ranking, changes with
        steps. Raises what batch 1 raises.
        """
        import torch

        probe = dataclasses.replace(
            unit,
            config=dataclasses.replace(
                unit.config,
                num_inference_steps=min(unit.config.num_inference_steps, PROBE_STEPS),
            ),
        )
        passes = guidance_passes(unit.config.guidance_scale)
        started = time.perf_counter()
        size = 1
        while size <= unit.num_images:
            self.batch_size = size  # what _generate pads to, when compiled
            batch = [i % len(unit.prompt_ids) for i in range(size)]
            try:
                self._generate(probe, batch, list(range(size)))
                began = time.perf_counter()
                self._generate(probe, batch, list(range(size)))
            except Exception as e:
                if size == 1 or not _out_of_memory(e):
                    raise
                log.info("batch_size auto: %d is out of memory (%s)", size, first_line(e))
                if self.device == "cuda":
                    torch.cuda.empty_cache()
                break
            rate = size / (time.perf_counter() - began)
            # warm now: the run's first call at this size is not a warm-up
            self._shapes.add((self.model, unit.config.task, size * passes, *unit.config.size))
            best = max(self.batch_probe.values(), default=0.0)
            self.batch_probe[size] = rate
            if rate < PROBE_GAIN * best:
                break
            size *= 2
        best = max(self.batch_probe, key=self.batch_probe.__getitem__)
        self.warmup_seconds += time.perf_counter() - started
        log.info(
            "batch_size auto: %d (images/s by batch size: %s)",
            best, ", ".join(f"{b}: {r:.3g}" for b, r in self.batch_probe.items()),
        )  # fmt: skip
        return best

    def _prompt_inputs(self, unit: WorkUnit, prompts: list[int]) -> dict[str, Any]:
        """The prompt arguments of the pipeline call for a batch of the unit's prompts: their
        text-encoder outputs, computed once per shard and reused by its configurations.

        The key holds everything the outputs depend on: the model, its adapter and scale (a
        LoRA may change the text encoder), the task's pipeline, whether guidance needs the
        negative prompts, and the texts. The pipeline computes the same tensors itself from
        the texts (`encode_prompt`, the same call); the text encoder's rows do not depend on
        what else is in its batch, so the images are the same bit for bit (tests check it).
        """
        import torch

        config = unit.config
        guided = guidance_passes(config.guidance_scale) > 1
        key = (
            self.model, config.task, config.lora, config.lora_scale, guided,
            unit.prompts, unit.negative_prompts,
        )  # fmt: skip
        if key in self._embedded:
            self._embedded.move_to_end(key)
        else:
            encoded = self._pipeline(config.task).encode_prompt(
                prompt=list(unit.prompts),
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=guided,
                negative_prompt=list(unit.negative_prompts),
            )
            # SD's pipelines return two tensors, SDXL's four; None where guidance needs none.
            self._embedded[key] = {
                name: tensor
                for name, tensor in zip(EMBEDDINGS, encoded, strict=False)
                if tensor is not None
            }
            while len(self._embedded) > EMBEDDING_CACHE:
                self._embedded.popitem(last=False)
        rows = torch.tensor(prompts, device=self.device)
        return {name: t[rows] for name, t in self._embedded[key].items()}

    def _row(
        self,
        unit: WorkUnit,
        p: int,
        sample: int,
        seed: int,
        flagged: bool | None,
        batch: int,
        seconds: float,
        warmup: bool,
    ) -> ImageRow:
        config = unit.config
        prompt_id = unit.prompt_ids[p]
        return ImageRow(
            # the PNG's bytes are filled in once its encoding finishes
            image={"bytes": None, "path": f"{config.config_id}/{prompt_id}-{sample}.png"},
            prompt_id=prompt_id,
            prompt=unit.prompts[p],
            negative_prompt=unit.negative_prompts[p],
            sample_index=sample,
            seed=seed,
            config_id=config.config_id,
            scheduler=config.scheduler,
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale,
            height=config.size[0],
            width=config.size[1],
            model=config.model or self.model,
            model_identity=self._sources[self.model].identity,
            lora=config.lora,
            lora_identity=self._adapter_names[config.lora][1].identity if config.lora else None,
            lora_scale=config.lora_scale,
            task=config.task,
            strength=config.strength,
            outpaint=config.outpaint,
            source_id=prompt_id if unit.sources else None,
            source_sha256=unit.sources[p].sha256 if unit.sources else None,
            dtype=self.setup.dtype,
            batch_size=batch,
            generation_seconds=seconds,
            warmup=warmup,
            nsfw_flagged=flagged,
        )


def _task_inputs(unit: WorkUnit, prompts: list[int]) -> dict[str, Any]:
    """The task's own arguments of the pipeline call, for a batch of the unit's prompts."""
    import torch

    config = unit.config
    height, width = config.size
    if config.task == "text2img":
        return {"height": height, "width": width}
    sources = [unit.sources[p] for p in prompts]
    images = [Image.open(io.BytesIO(s.image)).convert("RGB") for s in sources]
    if config.task == "img2img":
        return {"image": images, "strength": config.strength}
    if config.task == "depth2img":
        depths = [png_pixels(s.depth) for s in sources if s.depth is not None]
        # None: the pipeline's depth estimator runs (load_sources gives all rows one or none)
        depth = torch.from_numpy(np.stack(depths) / 255).float() if depths else None
        return {"image": images, "depth_map": depth, "strength": config.strength}
    if config.task == "inpaint":
        masks = [Image.open(io.BytesIO(s.mask)) for s in sources]
        strength = config.strength
    else:
        border = Expansion.parse(config.outpaint)
        sides = ((border.top, border.bottom), (border.left, border.right))
        images = [
            Image.fromarray(np.pad(np.asarray(i), (*sides, (0, 0)), mode="edge")) for i in images
        ]
        keep = np.zeros((config.height, config.width), np.uint8)
        masks = [Image.fromarray(np.pad(keep, sides, constant_values=255))] * len(images)
        strength = 1.0  # the border has nothing to keep: it starts from noise
    return {
        "image": images,
        "mask_image": masks,
        "height": height,
        "width": width,
        "strength": strength,
    }


def _return_freed_memory() -> None:
    """Give freed heap memory back to the system (glibc keeps it for reuse otherwise, so a
    freed model would still count in the process's memory)."""
    # not glibc: its allocator returns memory its own way
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _out_of_memory(error: Exception) -> bool:
    """CUDA's OutOfMemoryError, or the RuntimeError other accelerators (MPS, XPU) raise."""
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
