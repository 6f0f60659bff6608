"""An output written by sdbatch 0.1.0 (tests/fixtures/output-0.1.0) still resumes, extends,
evaluates and reports: the records on disk stay readable as the code that reads them changes."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest
import yaml
from conftest import REPO

from sdbatch.evaluation.reference import ReferenceSource
from sdbatch.evaluation.run import evaluate
from sdbatch.evaluation.suite import load_suite
from sdbatch.generation import generate
from sdbatch.reporting.write import write_report
from sdbatch.spec import load_spec

FIXTURE = REPO / "tests" / "fixtures" / "output-0.1.0"
KEY = ["prompt_id", "sample_index", "config_id"]


@pytest.fixture
def old(tmp_path):
    """A copy of the old output and the files that made it."""
    shutil.copytree(FIXTURE, tmp_path / "old")
    return tmp_path / "old"


def test_an_old_output_reports_from_its_own_metrics(old):
    path = write_report([str(old / "output")])
    markdown = (old / "output" / "report" / "report.md").read_text()
    configs = pd.read_parquet(old / "output" / "metrics" / "configs.parquet")
    assert path == f"{old / 'output'}/report/index.html"
    for config_id in configs["config_id"]:
        assert f"| {config_id} |" in markdown
    best = configs.loc[configs["fid"].idxmin()]
    assert f"Best by FID: **ddim, 2 steps, guidance {best['guidance_scale']:g}**" in markdown
    assert "builtin:tiny-clip" in markdown
    # its cost: evaluations derived from its configurations, its time the old mean, said so
    evals = 4 if best["guidance_scale"] > 1 else 2
    assert (
        f"{evals} UNet evaluations/image, {best['seconds_per_image']:.3f} s/image (mean, "
        in markdown
    )


def test_an_old_output_resumes_and_extends(old, ray_address):
    out = old / "output"
    markers = {p.name: p.read_bytes() for p in (out / "_units").iterdir()}
    summary = generate(load_spec(old / "job.yaml"), output=str(out), address=ray_address)
    assert summary.new_images == 0 and summary.total_images == 8
    assert {p.name: p.read_bytes() for p in (out / "_units").iterdir()} == markers

    wider = yaml.safe_load((old / "job.yaml").read_text())
    wider["sweep"]["guidance_scale"].append(4.0)
    (old / "wider.yaml").write_text(yaml.safe_dump(wider))
    summary = generate(load_spec(old / "wider.yaml"), output=str(out), address=ray_address)
    assert summary.new_images == 4 and summary.total_images == 12
    rows = pads.dataset(str(out / "images")).to_table(columns=KEY).to_pandas()
    assert len(rows) == 12 and not rows.duplicated().any()
    run = json.loads((out / "run.json").read_text())
    assert [h["new_images"] for h in run["history"]] == [8, 4]


def test_an_old_output_evaluates_from_its_shards_to_the_same_numbers(old, ray_address):
    """With the reference statistics 0.1.0 cached, against the same images: nothing needs
    extracting, and today's code must turn the old shards into the old numbers."""
    out = old / "output"
    before = pd.read_parquet(out / "metrics" / "configs.parquet").set_index("config_id")
    shards = {p: p.stat().st_mtime_ns for p in (out / "metrics" / "_shards").rglob("*.npz")}
    cached = ReferenceSource(stats=str(old / "reference-statistics.npz"))
    suite = dataclasses.replace(load_suite(old / "suite.yaml"), reference=cached)

    after = evaluate(str(out), suite, address=ray_address).configs.set_index("config_id")

    # the old shards were reused, not extracted again, and the numbers are the old ones; the
    # intervals are not: 0.1.0 resampled images, today's code resamples prompts
    assert {p: p.stat().st_mtime_ns for p in shards} == shards
    intervals = [c for c in before.columns if c.endswith(("_low", "_high"))]
    # KID's subsets are drawn by numpy now, not torch's generator: the same estimator on other
    # subsets (tests/test_kid.py checks it subset by subset against torchmetrics)
    kid = ["kid_mean", "kid_std"]
    metrics = [c for c in before.columns if c not in ["seconds_per_image", *intervals, *kid]]
    assert intervals and set(before.columns) - {"seconds_per_image"} <= set(after.columns)
    pd.testing.assert_frame_equal(after[metrics], before[metrics], rtol=1e-9, check_dtype=False)
    assert np.allclose(after["kid_mean"], before["kid_mean"], rtol=0.1)
    # cost: model evaluations from the configuration; its markers kept one time per unit (two
    # units of 2 images each here), so the median of the two is the old mean
    assert after["unet_evals_per_image"].to_dict() == {
        "ddim-s2-g1-26561f": 2,
        "ddim-s2-g7.5-122e94": 4,
    }
    assert np.allclose(after["seconds_per_image_median"], before["seconds_per_image"])
    assert (after["timed_batches"] == 2).all() and (after["devices"] == "unknown").all()
    record = json.loads((out / "metrics" / "metrics.json").read_text())
    assert record["images"] == 8 and record["suite"]["name"] == "old"
    assert record["bootstrap_unit"] == "prompt"
