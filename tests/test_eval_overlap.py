"""Evaluation's overlap: a feature worker decodes and preprocesses the next batch while its model
embeds this one, writing the same shards as without; the same actors extract the reference and
the generated shards."""

from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest
import torch
from conftest import suite_data

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


def worker(evaluated_output, prefetch: bool | None) -> FeatureWorker:
    inputs = resolve_suite(evaluated_output["suite"])
    return FeatureWorker(ExtractionSetup(
        clip=inputs.clip, extractor=inputs.extractor, batch_size=BATCH,
        image_metrics=inputs.image_metrics, clip_embeddings=True, prefetch=prefetch,
    ))  # fmt: skip


def test_prefetching_writes_the_same_shards(evaluated_output, tmp_path):
    shards = {}
    for prefetch in (False, True):
        extracting = worker(evaluated_output, prefetch)
        for unit in units(evaluated_output, tmp_path / str(prefetch)):
            *counts, _ = extracting.run(unit)
            assert sum(counts) == unit.num_images and len(counts) > 2
            shards[prefetch, unit.generated] = read_npz(unit.destination)
    for generated in (True, False):
        before, after = shards[False, generated], shards[True, generated]
        assert {"features", "clip_embeddings"} <= set(before) and set(before) == set(after)
        if generated:
            assert "clip_score" in before
        for name, array in before.items():
            if name != "unit_id":
                assert np.array_equal(array, after[name]), name


@pytest.mark.parametrize("prefetch", [True, False, None])
def test_the_next_batch_is_prepared_while_the_model_runs(evaluated_output, tmp_path, prefetch):
    """By default (None) only a GPU worker prefetches: a CPU worker's torch threads fill its
    cores, and there the extra thread made extraction slower."""
    extracting = worker(evaluated_output, prefetch)
    expected = torch.cuda.is_available() if prefetch is None else prefetch
    clip = extracting.clip
    spans = {"pixels": [], "embed": []}

    def timed(name, function, seconds=0.0):
        def call(*args):
            began = time.monotonic()
            time.sleep(seconds)  # a model slower than decoding, as most are
            result = function(*args)
            spans[name].append((began, time.monotonic(), threading.current_thread()))
            return result

        return call

    clip.pixels = timed("pixels", clip.pixels)
    clip.embed_pixels = timed("embed", clip.embed_pixels, seconds=0.2)
    list(extracting.run(units(evaluated_output, tmp_path)[0]))

    main = threading.main_thread()
    assert all(thread is main for *_, thread in spans["embed"])
    # batch k + 1 is prepared while batch k is embedded, in another thread
    overlapping = [
        start < embed_end and embed_start < end
        for (start, end, _), (embed_start, embed_end, _) in zip(
            spans["pixels"][1:], spans["embed"], strict=False
        )
    ]
    assert len(overlapping) == len(spans["embed"]) - 1 >= 2
    assert all(overlapping) if expected else not any(overlapping)
    assert all(thread is not main for *_, thread in spans["pixels"]) == expected


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
