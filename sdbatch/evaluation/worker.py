"""The feature worker: CLIP and the extractor loaded once, turning shards of images into shard
files of per-image features and scores, and their sufficient statistics per configuration.

A plain class, so tests run it in-process; distribute.py wraps it, unchanged, in a Ray actor.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdbatch.evaluation.clip import ClipEncoder
from sdbatch.evaluation.extractors import ExtractorInfo, build_extractor
from sdbatch.evaluation.images import decode_image, read_unit
from sdbatch.evaluation.metric import Metric, UnitImages
from sdbatch.evaluation.shards import (
    CLIP_EMBEDDINGS,
    UNIT_ID,
    FeatureUnit,
    reference_keys,
    shard_stats,
    write_npz,
)
from sdbatch.evaluation.sources import row_sources
from sdbatch.image_rows import KEY_COLUMNS
from sdbatch.models import ModelSource
from sdbatch.worker_logs import quiet_libraries


@dataclass(frozen=True)
class ExtractionSetup:
    """What every feature actor loads; plain values, so Ray ships them as they are."""

    clip: ModelSource | None  # None when no metric needs CLIP
    extractor: ExtractorInfo | None  # None when no metric needs features
    batch_size: int = 32
    image_metrics: tuple[Metric, ...] = ()  # the metrics whose per-image columns it writes
    clip_embeddings: bool = False  # shards keep every image's CLIP embedding (Need.EMBEDDINGS)
    threads: int | None = None
    log_dir: str | None = None  # for the libraries' warnings (quiet_libraries); None: as they are
    # Threads that decode and preprocess the next batch while the model embeds this one, each a
    # part of it (the features are the same either way); 0: none, each batch in turn. None: on a
    # GPU the worker's cores (the node's share per GPU, set by the driver), so the GPU never waits
    # for PIL; on a CPU none: a CPU actor's torch threads already fill its cores, and an extra
    # thread measured slower there.
    decode_threads: int | None = None


class FeatureWorker:
    """Loads CLIP and the extractor once; each `run` turns one unit into one shard file."""

    def __init__(self, setup: ExtractionSetup):
        import torch
        import transformers

        if setup.threads:
            torch.set_num_threads(setup.threads)
        if setup.log_dir:
            quiet_libraries(setup.log_dir, ("transformers",))
        # Loading bars of every worker would interleave with the driver's own progress bar.
        transformers.utils.logging.disable_progress_bar()
        self.setup = setup
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.clip = ClipEncoder(setup.clip, self.device) if setup.clip else None
        self.extract = None
        if setup.extractor is not None:
            self.extract = build_extractor(setup.extractor, self.device, self.clip)
        self.decode_threads = setup.decode_threads
        if self.decode_threads is None:
            self.decode_threads = len(os.sched_getaffinity(0)) if self.device == "cuda" else 0
        self.units = 0  # extracted, reference and generated alike

    def describe(self) -> dict[str, Any]:
        """Where this worker runs and how many units it extracted, for the provenance."""
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": self.device,
            "units": self.units,
        }

    def run(self, unit: FeatureUnit) -> Iterator[int | dict[str, Any]]:
        """Extract `unit`, yielding each batch's image count, then its statistics per config."""
        import torch

        # 1. read the encoded images (and, for generated ones, what made them)
        blobs, columns = read_unit(unit)
        # 2. decode, embed and extract, batch by batch (the clip extractor reuses the embeddings)
        images, embeddings, features = [], [], []
        embed = self.clip is not None and (unit.generated or self.setup.clip_embeddings)
        with torch.inference_mode():
            for batch, pixels in self._prepared(blobs, unit.resolution, embed):
                images += batch
                embedded = None
                if embed:
                    embedded = self.clip.embed_pixels(pixels)
                    embeddings.append(embedded)
                if self.extract is not None:
                    features.append(self.extract(batch, embedded))
                yield len(batch)
        # 3. score each generated image, then write the shard, keyed, and hand back its statistics
        shard: dict[str, np.ndarray] = {}
        if features:
            shard["features"] = np.concatenate(features).astype(np.float32)
        image_embeddings = np.concatenate(embeddings) if embeddings else None
        if image_embeddings is not None and self.setup.clip_embeddings:
            shard[CLIP_EMBEDDINGS] = image_embeddings.astype(np.float32)
        if unit.generated:
            scored = UnitImages(
                images=images,
                prompts=list(columns["prompt"]),
                clip=self.clip,
                image_embeddings=image_embeddings,
                sources=row_sources(unit.sources, columns) if unit.sources else [],
            )
            with torch.inference_mode():
                for metric in self.setup.image_metrics:
                    shard.update(metric.score_images(scored))
            for name in KEY_COLUMNS:
                shard[name] = np.asarray(columns[name])
        else:
            shard.update(reference_keys(unit))
        # What a rerun checks the shard against before it trusts it (shards.pending_units).
        shard[UNIT_ID] = np.asarray(unit.unit_id)
        write_npz(unit.destination, shard)
        self.units += 1
        yield {"unit_id": unit.unit_id, "stats": shard_stats(shard)}

    def _prepared(
        self, blobs: list[bytes], resolution: int | None, embed: bool
    ) -> Iterator[tuple[list[np.ndarray], Any]]:
        """Each batch decoded, with CLIP's pixel values when it is embedded. With decode threads,
        the next batch is prepared meanwhile, split among them (PIL's decoding and resizing,
        numpy and torch's model release the GIL): pixel values of two batches at most."""
        import torch

        def prepare(chunk: list[bytes]) -> tuple[list[np.ndarray], Any]:
            batch = [decode_image(blob, resolution) for blob in chunk]
            return batch, self.clip.pixels(batch) if embed else None

        size = self.setup.batch_size
        chunks = [blobs[start : start + size] for start in range(0, len(blobs), size)]
        threads = self.decode_threads
        if not threads or not chunks:
            yield from map(prepare, chunks)
            return
        with ThreadPoolExecutor(threads, thread_name_prefix="decode") as pool:

            def submit(chunk: list[bytes]) -> list[Future]:
                step = -(-len(chunk) // threads)
                parts = [chunk[i : i + step] for i in range(0, len(chunk), step)]
                return [pool.submit(prepare, part) for part in parts]

            def joined(parts: list[Future]) -> tuple[list[np.ndarray], Any]:
                prepared = [p.result() for p in parts]
                batch = [image for images, _ in prepared for image in images]
                return batch, torch.cat([pixels for _, pixels in prepared]) if embed else None

            ahead = submit(chunks[0])
            for chunk in chunks[1:]:
                ready = joined(ahead)
                ahead = submit(chunk)
                yield ready
            yield joined(ahead)
