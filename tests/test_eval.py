"""The evaluation stage end to end on a real Ray: tables, agreement with torchmetrics and with an
independent FID, resume, reference caching, and bad input."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.linalg
import torch
import yaml
from conftest import LONG_PROMPT, job, suite_data
from PIL import Image

from sdbatch.builtin import builtin_path
from sdbatch.cli import main as cli_main
from sdbatch.errors import InputError, JobFailed
from sdbatch.evaluation.clip import ClipEncoder
from sdbatch.evaluation.compare import compare
from sdbatch.evaluation.extractors import FidSettings, describe_extractor
from sdbatch.evaluation.metric_math import FeatureStats, FrechetReference, fid
from sdbatch.evaluation.reference import (
    ReferenceSource,
    ReferenceStats,
    load_stats,
    plan_reference,
    save_stats,
)
from sdbatch.evaluation.run import evaluate
from sdbatch.evaluation.shards import FeatureUnit, read_npz
from sdbatch.evaluation.suite import Suite, parse_suite
from sdbatch.evaluation.table import TIMING_COLUMNS, batch_frame, timing
from sdbatch.evaluation.worker import ExtractionSetup, FeatureWorker
from sdbatch.models import CLIP, resolve_model
from sdbatch.output import Output
from sdbatch.records import BatchTiming, UnitMarker
from sdbatch.toy.world import write_reference


def dataset(out: Path) -> pd.DataFrame:
    return pq.read_table(out / "images").to_pandas()


def decode(blob: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))


def test_tables_cover_every_image_and_join_back(evaluated_output):
    out = evaluated_output["out"]
    images = dataset(out)
    per_image = pd.read_parquet(out / "metrics" / "images.parquet")
    keys = ["prompt_id", "sample_index", "config_id"]
    joined = images.merge(per_image, on=keys, how="outer", validate="one_to_one", indicator=True)
    assert (joined["_merge"] == "both").all() and len(joined) == len(images) == 7 * 4 * 2

    configs = pd.read_csv(out / "metrics" / "configs.csv")
    assert sorted(configs["config_id"]) == sorted(images["config_id"].unique())
    assert (configs["n_images"] == 14).all()
    expected = per_image.groupby("config_id")["clip_score"].mean()
    assert np.allclose(configs.set_index("config_id")["clip_score"], expected[configs["config_id"]])
    assert (configs["clip_score_low"] <= configs["clip_score"]).all()
    assert (configs["clip_score"] <= configs["clip_score_high"]).all()
    assert (configs["fid_low"] < configs["fid"]).all() and (
        configs["fid"] < configs["fid_high"]
    ).all()
    assert (configs["kid_subset_size"] == 10).all() and configs["kid_mean"].notna().all()
    assert configs["fid_ill_conditioned"].all()  # 14 images < 16 feature dimensions
    # builtin:tiny has no safety checker: nothing flagged, not even "none flagged"
    assert configs["n_flagged"].isna().all() and (configs["n_excluded"] == 0).all()
    # cost: 2 steps, twice under guidance; times from each batch, the warm-up ones left out
    assert (configs["unet_evals_per_image"] == 2 * configs["guidance_scale"].gt(1).add(1)).all()
    warmups = {}
    for marker in Output(str(out)).done_units():
        # the image rows say which batch was warm-up, as the marker does
        rows = pq.read_table(out / marker.file, columns=["warmup"]).column(0).to_pylist()
        assert rows == [b.warmup for b in marker.batches for _ in range(b.images)]
        warmups.setdefault(marker.config_id, []).extend(b.warmup for b in marker.batches)
    per_config = configs.set_index("config_id")
    # 7 prompts x 2 images in shards of 2 prompts, batches of 4: 4 batches per configuration
    assert {c: len(w) for c, w in warmups.items()} == dict.fromkeys(per_config.index, 4)
    assert {c: sum(w) for c, w in warmups.items()} == per_config["warmup_batches"].to_dict()
    assert (per_config["timed_batches"] + per_config["warmup_batches"] == 4).all()
    timed = per_config.dropna(subset=["seconds_per_image_median"])
    assert len(timed) and (timed["devices"] == "cpu").all()
    assert (timed["seconds_per_image_q1"] <= timed["seconds_per_image_median"]).all()
    assert (timed["seconds_per_image_median"] <= timed["seconds_per_image_q3"]).all()
    parquet = pd.read_parquet(out / "metrics" / "configs.parquet")
    assert list(parquet.columns) == list(configs.columns) and len(parquet) == len(configs)

    record = json.loads((out / "metrics" / "metrics.json").read_text())
    assert record["truncated_prompts"] == 1
    assert per_image.loc[per_image["clip_truncated"], "prompt_id"].nunique() == 1
    assert record["extractor"]["name"] == "clip" and record["extractor"]["dim"] == 16
    assert record["extractor"]["resize"] == "clip-processor-pil"
    assert record["clip"]["identity"].startswith("sha256:")
    assert record["reference"]["sha256"] == load_stats(record["reference"]["cache"]).digest
    assert {"torchmetrics", "transformers", "torch"} <= set(record["versions"])
    assert record["bootstrap_unit"] == "prompt"


def test_intervals_resample_prompts_with_all_their_images(evaluated_output):
    # An independent reading: replicate r draws prompts by the documented generator, and a
    # configuration's replicate is the mean over every image of every drawn prompt.
    out, b = evaluated_output["out"], evaluated_output["suite"].bootstrap
    per_image = pd.read_parquet(out / "metrics" / "images.parquet")
    prompts = sorted(per_image["prompt_id"].unique())
    draws = np.random.default_rng(b.seed).integers(0, len(prompts), size=(b.samples, len(prompts)))
    replicates = pd.read_parquet(out / "metrics" / "replicates.parquet")
    configs = pd.read_parquet(out / "metrics" / "configs.parquet").set_index("config_id")
    for config_id, images in per_image.groupby("config_id"):
        by_prompt = images.groupby("prompt_id")["clip_score"]
        expected = [
            pd.concat([by_prompt.get_group(prompts[i]) for i in rows]).mean() for rows in draws
        ]
        stored = replicates[replicates["config_id"] == config_id].sort_values("replicate")
        np.testing.assert_allclose(stored["clip_score"], expected, rtol=1e-12)
        low, high = np.quantile(expected, [(1 - b.confidence) / 2, (1 + b.confidence) / 2])
        assert configs.loc[config_id, "clip_score_low"] == pytest.approx(low, rel=1e-12)
        assert configs.loc[config_id, "clip_score_high"] == pytest.approx(high, rel=1e-12)
    assert set(replicates.columns) >= {"config_id", "replicate", "clip_score", "fid"}
    assert len(replicates) == len(configs) * b.samples

    # FID's replicates of one configuration, from the shards' features by prompt
    config_id = configs.index[0]
    shards = [read_npz(str(p)) for p in (out / "metrics" / "_shards").glob("*/*.npz")]
    features = np.concatenate([s["features"][s["config_id"] == config_id] for s in shards])
    prompt_of = np.concatenate([s["prompt_id"][s["config_id"] == config_id] for s in shards])
    record = json.loads((out / "metrics" / "metrics.json").read_text())
    reference = load_stats(record["reference"]["cache"])
    stored_fid = replicates[replicates["config_id"] == config_id].sort_values("replicate")["fid"]
    for rows, stored in zip(draws[:3], stored_fid[:3], strict=True):
        x = np.concatenate([features[prompt_of == prompts[i]] for i in rows])
        mu, sigma = x.mean(axis=0), np.cov(x, rowvar=False)
        covmean = scipy.linalg.sqrtm(sigma @ reference.sigma).real
        d = mu - reference.mu
        expected = d @ d + np.trace(sigma) + np.trace(reference.sigma) - 2 * np.trace(covmean)
        assert stored == pytest.approx(expected, rel=1e-6)


def test_the_best_is_compared_with_the_others_and_each_axis_has_its_effects(evaluated_output):
    metrics, b = evaluated_output["out"] / "metrics", evaluated_output["suite"].bootstrap
    configs = pd.read_parquet(metrics / "configs.parquet")
    replicates = pd.read_parquet(metrics / "replicates.parquet")
    differences = pd.read_parquet(metrics / "differences.parquet")
    # ranked metrics only, each best against the 3 others at the Bonferroni level
    assert sorted(differences["metric"].unique()) == ["clip_score", "fid"]
    assert (differences.groupby("metric").size() == 3).all()
    assert np.allclose(differences["confidence"], 1 - (1 - b.confidence) / 3)
    row = differences[differences["metric"] == "clip_score"].iloc[0]
    d = compare(configs, replicates, row["best"], row["other"], "clip_score", row["confidence"])
    assert (d.difference, d.low, d.high) == (row["difference"], row["low"], row["high"])
    # the fixture sweeps scheduler and guidance (2 levels each), not steps
    effects = pd.read_parquet(metrics / "effects.parquet")
    assert set(effects["axis"]) == {"scheduler", "guidance_scale"}
    assert set(effects["column"]) == set(replicates.columns) - {"config_id", "replicate"}
    record = json.loads((metrics / "metrics.json").read_text())
    assert record["bootstrap_draws"].startswith("sha256:")


def test_timing_is_the_median_and_quartiles_of_batches_that_are_not_warm_up():
    gpu = (BatchTiming(4, 9.0, True), BatchTiming(4, 0.8, False), BatchTiming(2, 0.5, False))
    cpu = (BatchTiming(4, 1.2, False), BatchTiming(4, 4.0, False), BatchTiming(4, 0.6, False))
    markers = [
        UnitMarker("u1", "c", ("p",), 10, 0.0, device="NVIDIA H100", batches=gpu),
        UnitMarker("u2", "c", ("q",), 12, 0.0, device="cpu", batches=cpu),
        # a unit of sdbatch 0.1: no batches, its total time over its images
        UnitMarker("u3", "c", ("r",), 5, 1.5),
    ]
    got = timing(batch_frame(markers))
    per_image = np.array([0.8 / 4, 0.5 / 2, 1.2 / 4, 4.0 / 4, 0.6 / 4, 1.5 / 5])
    q1, median, q3 = np.percentile(per_image, [25, 50, 75])
    assert got["seconds_per_image_median"] == pytest.approx(median)
    assert got["seconds_per_image_q1"] == pytest.approx(q1)
    assert got["seconds_per_image_q3"] == pytest.approx(q3)
    assert (got["timed_batches"], got["warmup_batches"]) == (6, 1)
    assert got["devices"] == "NVIDIA H100, cpu, unknown"
    # only warm-up: no time is claimed
    alone = timing(batch_frame(markers[:1]).iloc[:1])
    assert np.isnan(alone["seconds_per_image_median"]) and alone["timed_batches"] == 0


class _TensorOutputs(torch.nn.Module):
    """torchmetrics 1.9 expects tensors from get_*_features; transformers 5 returns ModelOutputs
    (Lightning-AI/torchmetrics#3407). This adapter is the callable form's model."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        return self.model.get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs):
        return self.model.get_text_features(*args, **kwargs).pooler_output


def test_clip_score_equals_torchmetrics(evaluated_output):
    from torchmetrics.functional.multimodal import clip_score
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, CLIPProcessor

    folder = builtin_path("tiny-clip")
    model = _TensorOutputs(CLIPModel.from_pretrained(folder))
    processor = CLIPProcessor(
        image_processor=AutoImageProcessor.from_pretrained(folder, backend="pil"),
        tokenizer=AutoTokenizer.from_pretrained(folder),
    )
    images = dataset(evaluated_output["out"]).merge(
        pd.read_parquet(evaluated_output["out"] / "metrics" / "images.parquet"),
        on=["prompt_id", "sample_index", "config_id"],
    )
    # torchmetrics slices long prompts' token ids (dropping end-of-text); compare the others.
    images = images[~images["clip_truncated"]]
    for _, rows in images.groupby("config_id"):
        pixels = [torch.from_numpy(decode(b["bytes"])).permute(2, 0, 1) for b in rows["image"]]
        metric = CLIPScore(model_name_or_path=lambda: (model, processor))
        metric.update(pixels, list(rows["prompt"]))
        assert float(metric.compute()) == pytest.approx(rows["clip_score"].mean(), rel=1e-4)
        first = float(clip_score(pixels[0], rows["prompt"].iloc[0], lambda: (model, processor)))
        assert first == pytest.approx(rows["clip_score"].iloc[0], rel=1e-4)


def _independent_clip_features(images: list[np.ndarray]) -> np.ndarray:
    from transformers import CLIPImageProcessor, CLIPModel

    folder = builtin_path("tiny-clip")
    model = CLIPModel.from_pretrained(folder).eval()
    pixels = CLIPImageProcessor.from_pretrained(folder)(images=images, return_tensors="pt")
    with torch.no_grad():
        out = model.vision_model(pixel_values=pixels["pixel_values"]).pooler_output
        return model.visual_projection(out).double().numpy()


def _scipy_fid(x: np.ndarray, y: np.ndarray) -> float:
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    return float(
        (mu1 - mu2) @ (mu1 - mu2)
        + np.trace(s1 + s2)
        - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    )


def test_fid_equals_an_independent_computation_on_the_same_images(evaluated_output):
    """All the way from pixels: sharded extraction on actors, merged statistics, vs one pass."""
    images = dataset(evaluated_output["out"])
    reference = [
        decode(b["bytes"])
        for b in pq.read_table(evaluated_output["reference"])["image"].to_pylist()
    ]
    ref_features = _independent_clip_features(reference)
    configs = pd.read_csv(evaluated_output["out"] / "metrics" / "configs.csv").set_index(
        "config_id"
    )
    for config_id, rows in images.groupby("config_id"):
        features = _independent_clip_features([decode(b["bytes"]) for b in rows["image"]])
        assert configs.loc[config_id, "fid"] == pytest.approx(
            _scipy_fid(features, ref_features), rel=1e-4
        )


def test_rerun_extracts_only_missing_shards_and_reuses_the_reference(
    evaluated_output, tmp_path, ray_address
):
    out = tmp_path / "out"
    shutil.copytree(evaluated_output["out"], out)
    shards = sorted((out / "metrics" / "_shards").rglob("*.npz"))
    mtimes = {p: p.stat().st_mtime_ns for p in shards}
    cache = sorted((evaluated_output["root"] / "cache").glob("*.npz"))
    assert len(cache) == 1
    cache_mtime = cache[0].stat().st_mtime_ns
    shards[0].unlink()

    summary = evaluate(str(out), evaluated_output["suite"], address=ray_address)

    assert shards[0].exists()
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in shards[1:])
    assert cache[0].stat().st_mtime_ns == cache_mtime
    before = evaluated_output["summary"].configs.set_index("config_id").sort_index()
    after = summary.configs.set_index("config_id").sort_index()
    measured = list(TIMING_COLUMNS)
    pd.testing.assert_frame_equal(
        before.drop(columns=measured), after.drop(columns=measured), rtol=1e-6
    )


def test_reference_cache_name_changes_with_everything_it_depends_on(evaluated_output, tmp_path):
    clip = resolve_model("builtin:tiny-clip", None, CLIP)
    extractor = describe_extractor(FidSettings(features="clip"), clip)
    source = ReferenceSource(images=str(evaluated_output["reference"]))
    cache = str(tmp_path)

    def name(source=source, extractor=extractor):
        return plan_reference(source, extractor, cache).cache

    base = name()
    assert name() == base
    assert name(ReferenceSource(images=str(evaluated_output["reference"]), resolution=64)) != base
    assert name(ReferenceSource(images=str(evaluated_output["reference"]), limit=20)) != base
    other = describe_extractor(FidSettings(features="module:tiny_features:TinyFeatures"), None)
    assert name(extractor=other) != base
    copy = tmp_path / "reference.parquet"
    write_reference(str(copy), count=41, size=32)
    assert name(ReferenceSource(images=str(copy))) != base
    plan = plan_reference(ReferenceSource(images=str(copy), limit=20), extractor, cache)
    assert sum(u.num_images for u in plan.units) == 20


def test_reference_npz_round_trips_and_reads_pytorch_fid_files(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(50, 6)).astype(np.float32)
    stats = FeatureStats.of(features)
    mine = ReferenceStats(stats.mean(), stats.covariance(), 50, features, {"extractor": "x"})
    save_stats(str(tmp_path / "ref.npz"), mine)
    back = load_stats(str(tmp_path / "ref.npz"))
    assert np.array_equal(back.mu, mine.mu) and np.array_equal(back.sigma, mine.sigma)
    assert np.array_equal(back.features, features) and back.meta == {"extractor": "x"}
    assert back.digest == mine.digest
    assert fid(stats, FrechetReference(back.mu, back.sigma)) == pytest.approx(0, abs=1e-9)
    # pytorch-fid and clean-fid read exactly these two arrays
    with np.load(tmp_path / "ref.npz") as plain:
        assert np.array_equal(plain["mu"], mine.mu)
    np.savez(tmp_path / "pytorch_fid.npz", mu=mine.mu, sigma=mine.sigma)
    theirs = load_stats(str(tmp_path / "pytorch_fid.npz"))
    assert theirs.features is None and theirs.dim == 6


def test_a_user_module_extractor_runs_in_a_plain_worker(evaluated_output, tmp_path):
    from tiny_features import TinyFeatures

    extractor = describe_extractor(FidSettings(features="module:tiny_features:TinyFeatures"), None)
    assert extractor.dim == 12 and extractor.resize == "none"
    marker = json.loads(next((evaluated_output["out"] / "_units").glob("*.json")).read_text())
    unit = FeatureUnit(
        unit_id=marker["unit_id"],
        files=(str(evaluated_output["out"] / marker["file"]),),
        destination=str(tmp_path / "shard.npz"),
        num_images=marker["images"],
    )
    worker = FeatureWorker(ExtractionSetup(clip=None, extractor=extractor, batch_size=3))
    *counts, result = worker.run(unit)
    assert sum(counts) == marker["images"]
    shard = read_npz(unit.destination)
    rows = pq.read_table(evaluated_output["out"] / marker["file"]).to_pandas()
    pixels = torch.from_numpy(np.stack([decode(b["bytes"]) for b in rows["image"]]))
    expected = TinyFeatures()(pixels.permute(0, 3, 1, 2)).numpy()
    assert np.allclose(shard["features"], expected, rtol=1e-5, atol=1e-6)
    (stats,) = result["stats"].values()
    assert stats.count == marker["images"] and np.allclose(stats.total, expected.sum(0), rtol=1e-5)

    unstable = describe_extractor(FidSettings(features="module:tiny_features:RandomFeatures"), None)
    with pytest.raises(JobFailed, match="different weights"):
        FeatureWorker(ExtractionSetup(clip=None, extractor=unstable))


def test_a_feature_worker_imports_neither_pandas_nor_diffusers(evaluated_output, tmp_path):
    """An actor's start is mostly imports: what a feature worker has no use for stays out."""
    from sdbatch.evaluation.inputs import resolve_suite
    from sdbatch.evaluation.run import _setup

    inputs = resolve_suite(evaluated_output["suite"])
    setup = _setup(inputs, evaluated_output["suite"], inputs.reference.units, str(tmp_path))
    assert setup.clip is not None and setup.image_metrics  # CLIP loaded, metrics unpickled
    # A fresh process, as a Ray actor is: it unpickles the setup and builds the worker from it.
    started = subprocess.run(
        [sys.executable, "-c", WORKER_IMPORTS],
        input=pickle.dumps(setup), capture_output=True, text=False, check=True,
    )  # fmt: skip
    assert started.stdout.decode().split() == ["pandas=False", "diffusers=False"]


WORKER_IMPORTS = """
import pickle, sys
from sdbatch.evaluation.worker import FeatureWorker
FeatureWorker(pickle.loads(sys.stdin.buffer.read()))
print(*(f"{name}={name in sys.modules}" for name in ("pandas", "diffusers")))
"""


def test_long_prompts_are_truncated_keeping_end_of_text():
    encoder = ClipEncoder(resolve_model("builtin:tiny-clip", None, CLIP), "cpu")
    embedded, truncated = encoder.embed_texts([LONG_PROMPT, "a red circle"])
    assert truncated.tolist() == [True, False]
    tokens = encoder.tokenizer(LONG_PROMPT, truncation=True, max_length=77, return_tensors="pt")
    assert tokens["input_ids"].shape[1] == 77
    assert tokens["input_ids"][0, -1] == encoder.tokenizer.eos_token_id
    with torch.no_grad():
        kept = encoder.model.get_text_features(**tokens).pooler_output[0].numpy()
        sliced = encoder.tokenizer(LONG_PROMPT, return_tensors="pt")["input_ids"][:, :77]
        dropped = encoder.model.get_text_features(input_ids=sliced).pooler_output[0].numpy()
    assert np.allclose(embedded[0], kept, atol=1e-5)
    assert not np.allclose(embedded[0], dropped, atol=1e-3)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"metrics": ["clip_score", "fidd"]}, "metrics[1]: unknown metric 'fidd'"),
        ({"fid": {"features": "clip", "weights": "/nonexistent.pth"}}, "fid.weights: no weights"),
        ({"fid": {"features": "resnet"}}, "fid.features: must be inception or clip"),
        ({"reference": None}, "reference: required by metric fid"),
        ({"bootstrap": {"confidence": 95}}, "bootstrap.confidence: must be between 0 and 1"),
        ({"safety": "maybe"}, "safety: must be 'exclude' or 'include', got 'maybe'"),
    ],
)
def test_bad_suites_are_one_line_errors(evaluated_output, change, message):
    with pytest.raises(InputError) as error:
        parse_suite(
            suite_data(evaluated_output["reference"], evaluated_output["root"] / "cache", **change)
        )
    assert message in str(error.value) and "\n" not in str(error.value)


HOSTILE_SUITES = {
    "name-escapes": ({"name": "../x"}, "name: must be 1 to 100 letters, digits"),
    "bootstrap-1e12": ({"bootstrap": {"samples": 10**12}}, "bootstrap.samples: must be between 0"),
    "bootstrap-seed": ({"bootstrap": {"seed": -1}}, "bootstrap.seed: must be between 0 and 9,2"),
    "kid-subsets": ({"kid": {"subsets": 10**9}}, "kid.subsets: must be between 1 and 10,000"),
    "kid-size": ({"kid": {"subset_size": 10**9}}, "kid.subset_size: must be between 2 and 100,"),
    "actors": ({"runtime": {"actors": 100_000}}, "runtime.actors: must be between 1 and 1,024"),
    "batch": ({"runtime": {"batch_size": 0}}, "runtime.batch_size: must be between 1 and 1,024"),
    "retries": ({"runtime": {"retries": 1000}}, "runtime.retries: must be between 0 and 10"),
    "resolution": (
        {"reference": {"images": "x", "resolution": 800_000}},
        "reference.resolution: must be between 8 and 4,096, got 800000",
    ),
    "long-stats": ({"reference": {"stats": "s" * 5000}}, "reference.stats: no file at /"),
    "long-clip": (
        {"metrics": ["clip_score"], "clip": {"model": "c" * 5000}},
        "clip.model: cannot find 'ccc",
    ),
    "long-metric": ({"metrics": ["m" * 10_000]}, "metrics[0]: unknown metric 'mmmmm"),
    "not-callable": (
        {"fid": {"features": "module:math:pi"}},
        "fid.features: module:math:pi is a float, not a module class or a function returning one",
    ),
    "factory-raises": (
        {"fid": {"features": "module:math:sqrt"}},
        "fid.features: module:math:sqrt() raised TypeError: ",
    ),
    "forward-fails": (
        {"fid": {"features": "module:torch.nn:Softmax2d"}},
        "fid.features: Softmax2d fails on one 3 x 299 x 299 uint8 image (NotImplementedError",
    ),
    "not-a-module": ({"fid": {"features": "module:os:getcwd"}}, "gave a str, not an nn.Module"),
    "no-import": ({"fid": {"features": "module:no_such_pkg:X"}}, "cannot import no_such_pkg:X"),
}


@pytest.mark.parametrize("case", HOSTILE_SUITES)
def test_hostile_suites_are_one_line_errors(case, tmp_path, refused):
    """Through `sdbatch reference`: each is refused in one short line, quickly, before Ray
    (the fixture checks), with nothing written to the cache."""
    change, message = HOSTILE_SUITES[case]
    np.savez(tmp_path / "ref.npz", mu=np.zeros(12), sigma=np.eye(12))
    suite = {
        "name": "hostile",
        "metrics": ["fid"],
        "fid": {"features": "module:tiny_features:TinyFeatures"},
        "reference": {"stats": "ref.npz"},
        "cache": str(tmp_path / "cache"),
        **change,
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    assert message in refused("reference", path)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("suite", "message"),
    [
        ("name: &a [x, *a]\n", "suite: {path} has an alias inside its own anchor (line 1)"),
        (
            "metrics: [fid]\nfid: {features: 'module:math:pi'}\nreference: {stats: ref.npz}\n",
            "fid.features: module:math:pi is a float, not a module class or a function "
            "returning one",
        ),
    ],
    ids=["yaml-bounds", "extractor"],
)
@pytest.mark.parametrize("command", ["reference", "run"])
def test_a_hostile_suite_is_refused_before_any_work(
    suite, message, command, tmp_path, prompt_file, spec_file, refused
):
    """By `sdbatch reference`, and by `sdbatch run` before it generates anything."""
    np.savez(tmp_path / "ref.npz", mu=np.zeros(12), sigma=np.eye(12))
    path = tmp_path / "suite.yaml"
    path.write_text(suite)
    spec = spec_file(job(prompt_file(), suite="suite.yaml"))
    args = [path] if command == "reference" else [spec, "--out", tmp_path / "out"]
    assert refused(command, *args) == message.format(path=path)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "change",
    [
        {"metrics": ["clip_score", "fidd"]},
        {"fid": {"features": "clip", "weights": "/nonexistent.pth"}},
        {"reference": None},
        {"bootstrap": {"confidence": 95}},
    ],
)
def test_a_suite_built_in_python_is_checked_like_yaml(evaluated_output, change, ray_address):
    """Suite(...) raises what parse_suite raises; a file it names is checked, the same way,
    when evaluation resolves it, before any work."""
    data = suite_data(evaluated_output["reference"], evaluated_output["root"] / "cache", **change)
    with pytest.raises(InputError) as from_yaml:
        parse_suite(data)
    with pytest.raises(InputError) as from_python:
        evaluate(str(evaluated_output["out"]), Suite(**data), address=ray_address)
    assert str(from_python.value) == str(from_yaml.value)


def test_bad_inputs_fail_before_any_work(evaluated_output, tmp_path, ray_address):
    suite = evaluated_output["suite"]
    with pytest.raises(InputError, match="holds no sdbatch run"):
        evaluate(str(tmp_path / "nothing"), suite, address=ray_address)

    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(evaluated_output["out"] / "run.json", empty / "run.json")
    with pytest.raises(InputError, match="has no generated images yet"):
        evaluate(str(empty), suite, address=ray_address)

    eight = tmp_path / "eight.npz"
    np.savez(eight, mu=np.zeros(8), sigma=np.eye(8))
    data = suite_data(
        evaluated_output["reference"], tmp_path / "cache", reference={"stats": str(eight)}
    )
    with pytest.raises(InputError, match="holds 8-d statistics but the extractor clip gives 16-d"):
        evaluate(str(evaluated_output["out"]), parse_suite(data), address=ray_address)

    (tmp_path / "no-images").mkdir()
    data = suite_data(tmp_path / "no-images", tmp_path / "cache")
    with pytest.raises(InputError, match="holds no Parquet files and no images"):
        evaluate(str(evaluated_output["out"]), parse_suite(data), address=ray_address)
    assert not (tmp_path / "cache").exists()


def test_inception_features_equal_torchmetrics_fid(evaluated_output, tmp_path, ray_address):
    """Where torch-fidelity and the Inception weights are present (GPU machines), FID with the
    standard extractor equals torchmetrics' FrechetInceptionDistance on the same images."""
    if find_spec("torch_fidelity") is None:
        pytest.skip("torch-fidelity is not installed (pip install 'sdbatch[inception]')")
    weights = Path(torch.hub.get_dir(), "checkpoints", "weights-inception-2015-12-05-6726825d.pth")
    if not weights.is_file():
        pytest.skip(f"no Inception weights at {weights}")
    from torchmetrics.image.fid import FrechetInceptionDistance

    data = suite_data(evaluated_output["reference"], tmp_path / "cache", metrics=["fid"])
    data["fid"] = {"features": "inception", "weights": str(weights)}
    out = tmp_path / "out"
    shutil.copytree(evaluated_output["out"], out, ignore=shutil.ignore_patterns("metrics"))
    configs = evaluate(str(out), parse_suite(data), address=ray_address).configs.set_index(
        "config_id"
    )
    reference = pq.read_table(evaluated_output["reference"])["image"].to_pylist()
    for config_id, rows in dataset(evaluated_output["out"]).groupby("config_id"):
        # sdbatch's default resize is the TF1-compatible one: torchmetrics' antialias=False
        metric = FrechetInceptionDistance(
            feature=2048, feature_extractor_weights_path=str(weights), antialias=False
        )
        metric.set_dtype(torch.float64)
        for blobs, real in ((reference, True), (list(rows["image"]), False)):
            pixels = np.stack([decode(b["bytes"]) for b in blobs])
            metric.update(torch.from_numpy(pixels).permute(0, 3, 1, 2), real=real)
        assert configs.loc[config_id, "fid"] == pytest.approx(float(metric.compute()), rel=1e-4)


def test_inception_without_torch_fidelity_says_what_to_install(evaluated_output):
    if find_spec("torch_fidelity") is not None:
        pytest.skip("torch-fidelity is installed here")
    data = suite_data(
        evaluated_output["reference"],
        evaluated_output["root"] / "cache",
        fid={"features": "inception"},
    )
    with pytest.raises(InputError, match=r"pip install 'sdbatch\[inception\]'"):
        evaluate(str(evaluated_output["out"]), parse_suite(data))


def test_reference_command_on_a_folder_of_image_files(
    evaluated_output, tmp_path, spec_file, ray_address
):
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, cell in enumerate(pq.read_table(evaluated_output["reference"])["image"].to_pylist()):
        (folder / f"{i:03d}.png").write_bytes(cell["bytes"])
    suite = spec_file(suite_data(folder, tmp_path / "cache"), "suite.yaml")
    assert cli_main(["reference", str(suite)]) == 0
    (cached,) = (tmp_path / "cache").glob("*.npz")
    from_files = load_stats(str(cached))
    (from_parquet,) = (evaluated_output["root"] / "cache").glob("*.npz")
    # the same 40 images as the Parquet reference, so the same statistics
    assert from_files.count == 40
    assert np.allclose(from_files.mu, load_stats(str(from_parquet)).mu, rtol=1e-6)
    # the output's job spec names no suite, and none is given
    assert cli_main(["eval", str(evaluated_output["out"])]) == 2


def test_a_clip_score_only_suite_needs_no_reference(evaluated_output, tmp_path, ray_address):
    out = tmp_path / "out"
    shutil.copytree(evaluated_output["out"], out, ignore=shutil.ignore_patterns("metrics"))
    data = suite_data(evaluated_output["reference"], tmp_path / "cache", metrics=["clip_score"])
    del data["reference"]
    summary = evaluate(str(out), parse_suite(data), address=ray_address)
    assert "fid" not in summary.configs and "kid_mean" not in summary.configs
    before = evaluated_output["summary"].configs.set_index("config_id")["clip_score"]
    after = summary.configs.set_index("config_id")["clip_score"]
    pd.testing.assert_series_equal(before.sort_index(), after.sort_index(), rtol=1e-6)
    assert not (tmp_path / "cache").exists()
    assert json.loads((out / "metrics" / "metrics.json").read_text())["reference"] is None
