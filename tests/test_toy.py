"""The shipped toy text-to-image model, judged by sdbatch's own generate + eval on a small sweep.

The properties tie each image's recorded configuration to what it shows: were the scheduler,
steps or guidance recorded for an image not the ones used, the orderings below would not hold.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO

from sdbatch.evaluation.compare import compare
from sdbatch.evaluation.run import evaluate
from sdbatch.evaluation.suite import parse_suite
from sdbatch.generation import generate
from sdbatch.spec import parse_spec


@pytest.fixture(scope="module")
def toy_metrics(tmp_path_factory, ray_address):
    """The demo's 24 prompts (2 per color x shape) x 8 images, at few and many steps, without
    guidance, with the one the toy draws best at (2) and with a strong one (4)."""
    root = tmp_path_factory.mktemp("toy")
    spec = parse_spec(
        {
            "name": "toy",
            "model": "builtin:toy",
            "prompts": {"path": str(REPO / "jobs" / "demo-prompts.parquet"), "id_column": "id"},
            "sweep": {
                "scheduler": ["euler"],
                "num_inference_steps": [3, 20],
                "guidance_scale": [1.0, 2.0, 4.0],
                "images_per_prompt": 8,
                "height": 32,
                "width": 32,
            },
            # Two single-threaded actors draw this small model's images faster than one with two
            # threads (about 25% on 2 cores); no image depends on it.
            "runtime": {"batch_size": 16, "actors": 2},
        }
    )
    out = root / "out"
    generate(spec, output=str(out), address=ray_address)
    suite = parse_suite(
        {
            "name": "toy",
            "metrics": ["clip_score", "fid", "attribute_accuracy"],
            "clip": {"model": "builtin:toy-clip"},
            "fid": {"features": "clip"},
            "reference": {"images": str(REPO / "eval" / "demo-reference.parquet")},
            "bootstrap": {"samples": 200},
            "cache": str(root / "cache"),
            "runtime": {"actors": 2},
        }
    )
    return Path(evaluate(str(out), suite, address=ray_address).metrics)


@pytest.fixture(scope="module")
def toy(toy_metrics):
    configs = pd.read_parquet(toy_metrics / "configs.parquet")
    return configs.set_index(["num_inference_steps", "guidance_scale"])


def test_images_show_the_asked_for_color_and_shape(toy):
    good = toy.loc[(20, 2.0)]
    assert good["color_accuracy"] >= 0.8, good
    assert good["shape_accuracy"] >= 0.7, good


def test_guidance_raises_clip_score_beyond_its_paired_interval(toy, toy_metrics):
    low, high = toy.loc[(20, 1.0)], toy.loc[(20, 2.0)]
    configs = pd.read_parquet(toy_metrics / "configs.parquet")
    replicates = pd.read_parquet(toy_metrics / "replicates.parquet")
    d = compare(configs, replicates, low["config_id"], high["config_id"], "clip_score", 0.95)
    assert d.low > 0, (d, pd.DataFrame([low, high]))


def test_more_steps_lower_fid(toy):
    few, many = toy.loc[(3, 4.0)], toy.loc[(20, 4.0)]
    assert many["fid"] < few["fid"], pd.DataFrame([few, many])


def test_attribute_accuracy_is_the_share_of_images_with_every_attribute_right(toy, toy_metrics):
    images = pd.read_parquet(toy_metrics / "images.parquet")
    correct = images[[f"{a}_correct" for a in ("color", "shape", "size", "position")]]
    every = correct.eq(1.0).all(axis=1).astype(float).where(correct.notna().all(axis=1))
    expected = every.groupby(images["config_id"]).mean()
    got = toy.set_index("config_id")["attribute_accuracy"]
    assert np.allclose(got[expected.index], expected, atol=1e-12)
    assert (got <= toy.set_index("config_id")["color_accuracy"]).all()
