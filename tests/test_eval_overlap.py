"""Evaluation's overlap: a feature worker's decode threads prepare the next batch, each a part of
it, while its model embeds this one, writing the same shards as without; the same actors extract
the reference and the generated shards."""

from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest
import torch
from conftest import suite_data

from sdbatch import distribute
from sdbatch.evaluation.inputs import resolve_suite
from sdbatch.evaluation.reference import ReferenceSource, plan_reference
from sdbatch.evaluation.run import evaluate
from sdbatch.evaluation.shards import FeatureUnit, read_npz
from sdbatch.evaluation.suite import parse_suite
from sdbatch.evaluation.worker import ExtractionSetup, FeatureWorker

BATCH = 1  # a batch per image: the generated units hold 2 or 4


def units(evaluated_output, tmp_path) -> list[FeatureUnit]:
    """A generated unit and the reference's units, writing under tmp_path."""
    inputs = resolve_suite(evaluated_output["suite"])
    markers = [json.loads(p.read_text()) for p in (evaluated_output["out"] / "_units").iterdir()]
    marker = max(markers, key=lambda m: m["images"])
    generated = FeatureUnit(
        unit_id=marker["unit_id"],
        files=(str(evaluated_output["out"] / marker["file"]),),
        destination=str(tmp_path / "generated.npz"),
        num_images=marker["images"],
    )
    source = ReferenceSource(images=str(evaluated_output["reference"]))
    plan = plan_reference(source, inputs.extractor, str(tmp_path / "cache"), inputs.clip.identity)
    return [generated, *plan.units]


def worker(evaluated_output, decode_threads: int | None, batch: int = BATCH) -> FeatureWorker:
    inputs = resolve_suite(evaluated_output["suite"])
    return FeatureWorker(ExtractionSetup(
        clip=inputs.clip, extractor=inputs.extractor, batch_size=batch,
        image_metrics=inputs.image_metrics, clip_embeddings=True, decode_threads=decode_threads,
    ))  # fmt: skip


def test_decode_threads_write_the_same_shards(evaluated_output, tmp_path):
    """Batches of 3 split among 3 threads, and a last batch smaller than the threads."""
    shards = {}
    for threads in (0, 3):
        extracting = worker(evaluated_output, threads, batch=3)
        for unit in units(evaluated_output, tmp_path / str(threads)):
            *counts, _ = extracting.run(unit)
            assert sum(counts) == unit.num_images and len(counts) >= 2
            assert unit.num_images % 3 or not unit.generated  # a last batch of fewer
            shards[threads, unit.generated] = read_npz(unit.destination)
    for generated in (True, False):
        before, after = shards[0, generated], shards[3, generated]
        assert {"features", "clip_embeddings"} <= set(before) and set(before) == set(after)
        if generated:
            assert "clip_score" in before
        for name, array in before.items():
            if name != "unit_id":
                assert np.array_equal(array, after[name]), name


def timed(spans, name, function, seconds=0.0):
    def call(*args):
        began = time.monotonic()
        time.sleep(seconds)  # work that takes a while: a model slower than decoding, as most are
        result = function(*args)
        spans[name].append((began, time.monotonic(), threading.current_thread()))
        return result

    return call


def overlap(a, b) -> bool:
    return a[0] < b[1] and b[0] < a[1]


@pytest.mark.parametrize("decode_threads", [1, 0, None])
def test_the_next_batch_is_prepared_while_the_model_runs(
    evaluated_output, tmp_path, decode_threads
):
    """By default (None) only a GPU worker has decode threads: a CPU worker's torch threads fill
    its cores, and there an extra thread made extraction slower."""
    extracting = worker(evaluated_output, decode_threads)
    expected = torch.cuda.is_available() if decode_threads is None else decode_threads > 0
    clip = extracting.clip
    spans = {"pixels": [], "embed": []}
    clip.pixels = timed(spans, "pixels", clip.pixels)
    clip.embed_pixels = timed(spans, "embed", clip.embed_pixels, seconds=0.2)
    list(extracting.run(units(evaluated_output, tmp_path)[0]))

    main = threading.main_thread()
    assert all(thread is main for *_, thread in spans["embed"])
    # batch k + 1 is prepared while batch k is embedded, in another thread
    pairs = zip(spans["pixels"][1:], spans["embed"], strict=False)
    overlapping = [overlap(pixels, embed) for pixels, embed in pairs]
    assert len(overlapping) == len(spans["embed"]) - 1 >= 2
    assert all(overlapping) if expected else not any(overlapping)
    assert all(thread is not main for *_, thread in spans["pixels"]) == expected


def test_a_batch_is_split_among_the_decode_threads(evaluated_output, tmp_path):
    """Batches of 4 on 2 threads: each batch's two halves are prepared at once, in two threads."""
    extracting = worker(evaluated_output, 2, batch=4)
    clip = extracting.clip
    spans = {"pixels": []}
    clip.pixels = timed(spans, "pixels", clip.pixels, seconds=0.2)
    generated = units(evaluated_output, tmp_path)[0]
    list(extracting.run(generated))

    halves = spans["pixels"]
    assert len(halves) == 2 * -(-generated.num_images // 4) >= 2
    first, second = halves[0], halves[1]
    assert overlap(first, second) and first[2] is not second[2]


def test_the_same_actors_extract_the_reference_and_the_generated_shards(
    evaluated_output, tmp_path, ray_address
):
    out = tmp_path / "out"
    shutil.copytree(evaluated_output["out"], out)
    shutil.rmtree(out / "metrics")
    suite = parse_suite(suite_data(evaluated_output["reference"], tmp_path / "cache"))
    reference = resolve_suite(suite).reference.units
    generated = list((out / "_units").glob("*.json"))

    evaluate(str(out), suite, address=ray_address)

    workers = json.loads((out / "metrics" / "metrics.json").read_text())["workers"]
    # An actor still loading when the last unit ends took none and is not listed.
    assert 1 <= len({w["pid"] for w in workers}) == len(workers) <= suite.runtime.actors
    assert sum(w["units"] for w in workers) == len(reference) + len(generated)


def test_a_gpu_actor_decodes_with_its_nodes_cores_per_gpu(monkeypatch):
    """The fewest cores per GPU of any GPU node, so no node's actors crowd its cores; nodes
    without GPUs and dead nodes do not count."""
    import ray

    nodes = [
        {"Alive": True, "Resources": {"CPU": 96.0, "GPU": 8.0}},
        {"Alive": True, "Resources": {"CPU": 40.0, "GPU": 4.0}},
        {"Alive": True, "Resources": {"CPU": 2.0}},
        {"Alive": False, "Resources": {"CPU": 4.0, "GPU": 4.0}},
    ]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    assert distribute.cpus_per_gpu() == 10
    nodes[1]["Resources"]["CPU"] = 2.0
    assert distribute.cpus_per_gpu() == 1  # never none
    monkeypatch.setattr(ray, "nodes", lambda: nodes[2:3])
    assert distribute.cpus_per_gpu() == 1
