"""CMMD: its math against the formula computed pair by pair, its bootstrap replicates against a
recomputation on the repeated images, and an evaluation against CMMD recomputed from the stored
images with the same CLIP."""

from __future__ import annotations

import io
import logging
import math
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import suite_data
from PIL import Image

from sdbatch.errors import InputError
from sdbatch.evaluation.clip import ClipEncoder
from sdbatch.evaluation.extractors import FidSettings, describe_extractor
from sdbatch.evaluation.inputs import resolve_suite
from sdbatch.evaluation.metric import Bootstrap, ConfigGroup, aggregate_with_intervals
from sdbatch.evaluation.metric_math import cluster_counts
from sdbatch.evaluation.metrics import cmmd as cmmd_module
from sdbatch.evaluation.metrics.cmmd import CMMD, MmdKernels, cmmd, normalized
from sdbatch.evaluation.reference import ReferenceSource, ReferenceStats, plan_reference
from sdbatch.evaluation.run import evaluate
from sdbatch.evaluation.shards import read_npz
from sdbatch.evaluation.suite import parse_suite
from sdbatch.evaluation.worker import ExtractionSetup, FeatureWorker
from sdbatch.models import CLIP, resolve_model
from sdbatch.reporting.write import write_report


def direct_cmmd(x: np.ndarray, y: np.ndarray) -> float:
    """The reference code's formula, pair by pair: 1000 (mean k(x, x') + mean k(y, y')
    - 2 mean k(x, y)), each mean over all pairs (the diagonal included), k(a, b) =
    exp(-|a - b|² / (2 * 10²)) on L2-normalised embeddings."""
    x = [v / math.sqrt(sum(float(c) ** 2 for c in v)) for v in np.asarray(x, dtype=np.float64)]
    y = [v / math.sqrt(sum(float(c) ** 2 for c in v)) for v in np.asarray(y, dtype=np.float64)]

    def mean_kernel(a, b):
        total = 0.0
        for u in a:
            for v in b:
                squared = sum((p - q) ** 2 for p, q in zip(u, v, strict=True))
                total += math.exp(-squared / (2 * 10.0**2))
        return total / (len(a) * len(b))

    return 1000 * (mean_kernel(x, x) + mean_kernel(y, y) - 2 * mean_kernel(x, y))


def test_cmmd_is_the_formula_computed_pair_by_pair(monkeypatch):
    rng = np.random.default_rng(0)
    generated, reference = rng.normal(size=(7, 5)) * 3, rng.normal(0.3, 1, size=(11, 5))
    expected = direct_cmmd(generated, reference)
    assert expected > 1  # far from 0, so a wrong term would show
    assert cmmd(generated, reference) == pytest.approx(expected, rel=1e-10)
    # kernel sums in blocks of rows, as for a large reference
    monkeypatch.setattr(cmmd_module, "BLOCK", 3)
    assert cmmd(generated, reference) == pytest.approx(expected, rel=1e-10)


def test_identical_sets_give_zero_and_scale_does_not_matter():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(9, 6))
    # the biased estimator is exactly 0 for identical sets; rounding leaves ~1e-13
    assert cmmd(x, x) == pytest.approx(0, abs=1e-9)
    assert cmmd(x, 5 * x) == pytest.approx(0, abs=1e-9)  # embeddings are L2-normalised
    assert cmmd(x[:5], x) > 0


def test_replicates_equal_cmmd_of_the_repeated_images():
    rng = np.random.default_rng(2)
    generated, reference = rng.normal(size=(8, 5)), rng.normal(0.2, 1, size=(10, 5))
    kernels = MmdKernels.of(normalized(generated), normalized(reference))
    assert kernels.cmmd() == pytest.approx(cmmd(generated, reference), rel=1e-12)
    for weights in cluster_counts(8, 5, seed=3):
        repeated = np.repeat(generated, weights, axis=0)
        assert kernels.cmmd(weights) == pytest.approx(direct_cmmd(repeated, reference), rel=1e-9)
    assert math.isnan(kernels.cmmd(np.zeros(8)))


def test_kernels_are_computed_once_per_configuration_and_once_per_reference(monkeypatch):
    rng = np.random.default_rng(4)
    real = rng.normal(size=(12, 5))
    reference = ReferenceStats(None, None, len(real), clip_embeddings=real)
    calls = {"of": 0, "reference": 0}
    of, mean = MmdKernels.of.__func__, cmmd_module.reference_kernel_mean

    def counted_of(cls, *args):
        calls["of"] += 1
        return of(cls, *args)

    def counted_mean(*args):
        calls["reference"] += 1
        return mean(*args)

    monkeypatch.setattr(MmdKernels, "of", classmethod(counted_of))
    monkeypatch.setattr(cmmd_module, "reference_kernel_mean", counted_mean)
    for config in ("a", "b"):
        embeddings = rng.normal(size=(6, 5))
        group = ConfigGroup(
            config_id=config,
            images=pd.DataFrame({"prompt_id": range(6)}),
            merged=None,
            reference=reference,
            frechet=None,
            feature_dim=None,
            bootstrap=Bootstrap(samples=30),
            load_features=lambda: None,
            load_clip_embeddings=lambda embeddings=embeddings: embeddings,
        )
        weights = cluster_counts(6, 30, seed=0)
        row, replicates = aggregate_with_intervals(CMMD, group, None, weights)
        assert row["cmmd"] == pytest.approx(direct_cmmd(embeddings, real), rel=1e-9)
        for r in (0, 17):
            repeated = np.repeat(embeddings, weights[r], axis=0)
            assert replicates["cmmd"][r] == pytest.approx(direct_cmmd(repeated, real), rel=1e-9)
        assert row["cmmd_low"] < row["cmmd"] < row["cmmd_high"]
    assert calls == {"of": 2, "reference": 1}


def decode(blob: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))


@pytest.fixture(scope="module")
def expected_cmmd(evaluated_output):
    """Per configuration, CMMD recomputed pair by pair from CLIP embeddings of the stored images
    and of the reference images, embedded here with the suite's CLIP."""
    clip = ClipEncoder(resolve_model("builtin:tiny-clip", None, CLIP), "cpu")
    rows = pq.read_table(evaluated_output["reference"]).to_pylist()
    real = clip.embed_images([decode(r["image"]["bytes"]) for r in rows])
    dataset = pq.read_table(evaluated_output["out"] / "images").to_pandas()
    return {
        config: direct_cmmd(clip.embed_images([decode(c["bytes"]) for c in group["image"]]), real)
        for config, group in dataset.groupby("config_id")
    }


def test_an_evaluation_writes_cmmd_as_recomputed_from_the_images(
    evaluated_output, expected_cmmd, tmp_path, ray_address
):
    out = tmp_path / "out"
    shutil.copytree(evaluated_output["out"], out, ignore=shutil.ignore_patterns("metrics"))
    data = suite_data(evaluated_output["reference"], tmp_path / "cache")
    suite = parse_suite({**data, "metrics": ["clip_score", "cmmd"]})
    configs = evaluate(str(out), suite, address=ray_address).configs.set_index("config_id")

    expected = pd.Series(expected_cmmd)[configs.index]
    assert len(set(expected.round(6))) == len(expected) > 1  # configurations differ
    assert np.allclose(configs["cmmd"], expected, rtol=1e-5)
    assert (configs["cmmd_low"] < configs["cmmd"]).all()
    assert (configs["cmmd"] < configs["cmmd_high"]).all()
    replicates = pd.read_parquet(out / "metrics" / "replicates.parquet")
    assert replicates["cmmd"].notna().all()
    # the reference cache holds the embeddings alone: no metric needs features
    (cached,) = (tmp_path / "cache").glob("*.npz")
    assert "-clipemb-" in cached.name
    assert set(read_npz(str(cached))) == {"count", "clip_embeddings", "meta"}

    # a rerun trusts the shards and the cache: nothing is extracted, the numbers are the same
    again = evaluate(str(out), suite, address=ray_address)
    assert again.extraction_seconds == 0.0
    assert again.configs.set_index("config_id")["cmmd"].equals(configs["cmmd"])
    write_report(str(out))
    assert "| CMMD [CI] |" in (out / "report" / "report.md").read_text()


def test_shards_written_without_embeddings_are_extracted_again(
    evaluated_output, expected_cmmd, tmp_path, ray_address, caplog
):
    # The fixture's shards were written for CLIP score and FID on CLIP features: same key.
    out = tmp_path / "out"
    shutil.copytree(evaluated_output["out"], out)
    shards = list((out / "metrics" / "_shards").glob("*/*.npz"))
    assert shards and all("clip_embeddings" not in read_npz(str(s)) for s in shards)
    data = suite_data(evaluated_output["reference"], tmp_path / "cache")
    suite = parse_suite({**data, "metrics": ["clip_score", "fid", "cmmd"]})
    caplog.set_level(logging.WARNING, logger="sdbatch")
    configs = evaluate(str(out), suite, address=ray_address).configs.set_index("config_id")

    assert caplog.text.count("lacks the arrays clip_embeddings") == len(shards)
    assert all("clip_embeddings" in read_npz(str(s)) for s in shards)
    assert np.allclose(configs["cmmd"], pd.Series(expected_cmmd)[configs.index], rtol=1e-5)
    before = evaluated_output["summary"].configs.set_index("config_id")
    assert np.allclose(configs["fid"], before.loc[configs.index, "fid"], rtol=1e-6)
    # With fid.features: clip one embedding serves both: the reference's features are its
    # embeddings.
    (cached,) = (tmp_path / "cache").glob("*.npz")
    arrays = read_npz(str(cached))
    assert np.array_equal(arrays["features"], arrays["clip_embeddings"])


def test_the_clip_extractor_embeds_each_reference_image_once(evaluated_output, tmp_path):
    clip = resolve_model("builtin:tiny-clip", None, CLIP)
    extractor = describe_extractor(FidSettings(features="clip"), clip)
    source = ReferenceSource(images=str(evaluated_output["reference"]))
    plan = plan_reference(source, extractor, str(tmp_path), clip.identity)
    assert plan.arrays == ("features", "clip_embeddings")
    (unit,) = plan.units
    worker = FeatureWorker(ExtractionSetup(clip, extractor, batch_size=16, clip_embeddings=True))
    embedded = []
    embed = worker.clip.embed_pixels
    worker.clip.embed_pixels = lambda pixels: embedded.append(len(pixels)) or embed(pixels)
    list(worker.run(unit))
    assert sum(embedded) == unit.num_images == 40
    assert plan.missing_units() == []


def test_a_reference_npz_without_embeddings_is_refused_before_any_work(tmp_path):
    rng = np.random.default_rng(5)
    np.savez(tmp_path / "ref.npz", mu=rng.normal(size=4), sigma=np.eye(4))
    data = suite_data(tmp_path, tmp_path / "cache", metrics=["cmmd"])
    suite = parse_suite({**data, "reference": {"stats": str(tmp_path / "ref.npz")}})
    with pytest.raises(InputError, match=r"^reference\.stats: .* holds no CLIP image embeddings"):
        resolve_suite(suite)
