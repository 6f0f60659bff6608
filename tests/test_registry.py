"""The metric registry: each metric writes the columns it declares, and a metric declared once in
one module and registered with one line flows through suites, evaluation and the report."""

from __future__ import annotations

import io
import json
import shutil
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import suite_data
from PIL import Image
from ray import cloudpickle

from sdbatch.errors import InputError
from sdbatch.evaluation.clip import ClipEncoder
from sdbatch.evaluation.metric import (
    QUALITY,
    Bootstrap,
    ConfigGroup,
    Interval,
    Metric,
    Score,
    UnitImages,
    aggregate_with_intervals,
)
from sdbatch.evaluation.metric_math import FeatureStats, FrechetReference, cluster_counts
from sdbatch.evaluation.metrics.kid import KidSettings
from sdbatch.evaluation.metrics.prdc import PrdcSettings
from sdbatch.evaluation.reference import ReferenceStats
from sdbatch.evaluation.registry import REGISTRY
from sdbatch.evaluation.run import evaluate
from sdbatch.evaluation.suite import parse_suite
from sdbatch.models import CLIP, resolve_model
from sdbatch.reporting.write import write_report

# Ray's actors cannot import this test module: its metric travels to them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])
KEY = ["prompt_id", "sample_index", "config_id"]
SETTINGS = {"kid": KidSettings(subsets=5, subset_size=10), "prdc": PrdcSettings()}


def decode(blob: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))


def synthetic_group(n: int = 20, dim: int = 4) -> ConfigGroup:
    """A configuration of n images with random per-image columns of every metric and random
    features (and CLIP embeddings), against a random reference."""
    rng = np.random.default_rng(0)
    features, real = rng.normal(size=(n, dim)), rng.normal(0.5, 1.0, size=(30, dim))
    merged = FeatureStats.of(real)
    reference = ReferenceStats(
        merged.mean(), merged.covariance(), len(real), real, clip_embeddings=real
    )
    columns = {c: rng.random(n) for m in REGISTRY.values() for c in m.image_columns}
    return ConfigGroup(
        config_id="c",
        images=pd.DataFrame(columns),
        merged=FeatureStats.of(features),
        reference=reference,
        frechet=FrechetReference(reference.mu, reference.sigma),
        feature_dim=dim,
        bootstrap=Bootstrap(samples=50),
        load_features=lambda: features,
        load_clip_embeddings=lambda: features,
    )


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_a_metric_aggregates_into_the_columns_the_report_shows(name):
    metric, group = REGISTRY[name], synthetic_group()
    weights = cluster_counts(len(group.images), 50, seed=0)  # one image per prompt
    row, _ = aggregate_with_intervals(metric, group, SETTINGS.get(metric.settings), weights)
    for score in metric.scores:
        assert np.isfinite(row[score.column]), score
        if score.interval:
            assert row[f"{score.column}_low"] <= row[score.column] <= row[f"{score.column}_high"]
        if score.spread:
            assert np.isfinite(row[score.spread])
        assert score.cell(row) != "n/a"


def test_per_image_scores_are_the_declared_columns(evaluated_output):
    rows = pq.read_table(next((evaluated_output["out"] / "images").glob("*.parquet"))).to_pylist()
    images = [decode(r["image"]["bytes"]) for r in rows]
    clip = ClipEncoder(resolve_model("builtin:tiny-clip", None, CLIP), "cpu")
    unit = UnitImages(images, [r["prompt"] for r in rows], clip, clip.embed_images(images))
    for metric in (m for m in REGISTRY.values() if m.score_images):
        scored = metric.score_images(unit)
        assert set(scored) == set(metric.image_columns), metric.name
        assert all(len(values) == len(rows) for values in scored.values()), metric.name


# A metric as a new module would declare it: the share of bright pixels, judged per image.
def bright_share(unit: UnitImages) -> dict[str, np.ndarray]:
    return {"bright_share": np.array([(image.mean(axis=2) > 128).mean() for image in unit.images])}


BRIGHTNESS = Metric(
    name="brightness",
    label="bright share",
    higher_is_better=True,
    judges=QUALITY,
    needs=frozenset(),  # the pixels alone
    interval=Interval.PERCENTILE,
    aggregate=lambda group, settings: group.mean("bright_share"),
    scores=(Score("bright_share", "bright share"),),
    image_columns=("bright_share",),
    score_images=bright_share,
    shard_token="brightness",
)


def test_a_new_metric_is_one_declaration_and_one_registration(
    evaluated_output, tmp_path, monkeypatch, ray_address
):
    data = suite_data(tmp_path, tmp_path / "cache", metrics=["clip_score", "brightness"])
    del data["reference"]
    with pytest.raises(InputError, match="metrics\\[1\\]: unknown metric 'brightness'"):
        parse_suite(data)

    monkeypatch.setitem(REGISTRY, "brightness", BRIGHTNESS)
    out = tmp_path / "out"
    shutil.copytree(evaluated_output["out"], out, ignore=shutil.ignore_patterns("metrics"))
    configs = evaluate(str(out), parse_suite(data), address=ray_address).configs

    # per image, what an independent reading of the stored PNGs gives
    dataset = pq.read_table(out / "images").to_pandas()
    per_image = pd.read_parquet(out / "metrics" / "images.parquet").merge(dataset, on=KEY)
    expected = [(decode(c["bytes"]).mean(axis=2) > 128).mean() for c in per_image["image"]]
    assert np.allclose(per_image["bright_share"], expected)
    assert len(set(expected)) > 1  # images differ, so a wrong join would show
    # per configuration, the mean with an interval, after the other metrics' columns
    means = per_image.groupby("config_id")["bright_share"].mean()
    configs = configs.set_index("config_id")
    assert np.allclose(configs["bright_share"], means[configs.index])
    assert (configs["bright_share_low"] <= configs["bright_share"]).all()
    assert (configs["bright_share"] <= configs["bright_share_high"]).all()
    assert list(configs.columns)[-3:] == ["bright_share", "bright_share_low", "bright_share_high"]
    # its interval method recorded, and its column in the report
    record = json.loads((out / "metrics" / "metrics.json").read_text())
    assert record["intervals"]["brightness"] == Interval.PERCENTILE.value
    assert record["bootstrap_unit"] == "prompt"
    write_report(str(out))
    assert "| bright share [CI] |" in (out / "report" / "report.md").read_text()
