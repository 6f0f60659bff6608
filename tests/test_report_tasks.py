"""The report of an image-conditioned run: source | result pairs (the inpainting mask outlined,
the outpainted canvas framed), each metric against strength with intervals, the per-strength
table and the preservation trade-off; an output evaluated before tasks reports as before."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import suite_data
from PIL import Image
from test_task_metrics import build_task_output

from sdbatch.evaluation.compare import main_effects
from sdbatch.evaluation.registry import PSNR, STRENGTH_METRICS
from sdbatch.output import SOURCES
from sdbatch.reporting.plots import versus_figure
from sdbatch.reporting.runs import load_run
from sdbatch.reporting.tasks import OUTLINE, _outlined, _result
from sdbatch.reporting.write import write_report

# One inpainting run over three strengths (each a configuration of the generated sweep).
STRENGTHS = {1.0: ("inpaint", 0.3, None), 4.0: ("inpaint", 0.6, None), 7.5: ("inpaint", 0.9, None)}
METRICS = ["clip_score", "attribute_accuracy", "clip_directional", "psnr", "ssim"]


@pytest.fixture(scope="module")
def reported_tasks(tmp_path_factory, ray_address):
    """The run evaluated, its configs given their strengths as sweep.Config will give them (this
    branch's Config has none: every configuration reads text2img), with the same guidance so
    that strength alone varies; effects recomputed from them; then reported."""
    from sdbatch.evaluation.run import evaluate
    from sdbatch.evaluation.suite import parse_suite

    root = tmp_path_factory.mktemp("report-tasks")
    out, sources = build_task_output(root, ray_address, STRENGTHS)
    data = suite_data(root, root / "cache", metrics=METRICS)
    del data["reference"]
    evaluate(str(out), parse_suite(data), address=ray_address)
    metrics = out / "metrics"
    configs = pd.read_parquet(metrics / "configs.parquet")
    strengths = {g: s for g, (_, s, _) in STRENGTHS.items()}
    configs["task"] = "inpaint"
    configs["strength"] = configs["guidance_scale"].map(strengths)
    configs["guidance_scale"] = 7.5
    configs.to_parquet(metrics / "configs.parquet")
    replicates = pd.read_parquet(metrics / "replicates.parquet")
    main_effects(configs, replicates, 0.95).to_parquet(metrics / "effects.parquet")
    index = write_report(str(out))
    return {"out": out, "index": index, "configs": configs, "sources": sources}


def test_report_shows_sources_strength_plots_and_the_tradeoff(reported_tasks):
    report = reported_tasks["out"] / "report"
    names = {p.name for p in report.glob("*.png")}
    expected = {f"{m.name}_vs_strength.png" for m in STRENGTH_METRICS if m.name in METRICS}
    assert expected | {"sources.png", "preservation_tradeoff.png"} <= names, names
    text = (report / "report.md").read_text()
    assert "## Image-conditioned task: test" in text
    assert "outside the mask" in text
    # the per-strength table: each strength's PSNR mean as effects.parquet has it
    effects = pd.read_parquet(reported_tasks["out"] / "metrics" / "effects.parquet")
    psnr = effects[(effects["axis"] == "strength") & (effects["column"] == "psnr")]
    assert list(psnr["level"].astype(float)) == [0.3, 0.6, 0.9]
    for level, mean in zip(psnr["level"], psnr["mean"], strict=True):
        assert f"| {float(level):g} |" in text and f"{mean:.2f} [" in text
    # more strength changed more outside the mask (noise 3, 6, 9): preservation falls
    assert psnr["mean"].is_monotonic_decreasing
    # the sources gallery: the inpainting mask outlined in magenta on each source
    sheet = np.asarray(Image.open(report / "sources.png").convert("RGB"))
    assert (sheet == OUTLINE).all(axis=2).sum() > 100


def test_strength_plot_draws_each_configuration_at_its_strength(reported_tasks):
    run = load_run(str(reported_tasks["out"]))
    fig = versus_figure([run], PSNR, "strength")
    (line,) = [ln for ln in fig.axes[0].lines if not ln.get_label().startswith("_")]
    configs = run.configs.sort_values("strength")
    # one line (same scheduler, steps and guidance), the strengths evenly spaced, in order
    assert np.allclose(line.get_ydata(), configs["psnr"])
    assert np.allclose(np.diff(line.get_xdata()), 1.0)


def test_mask_outline_and_outpainted_canvas_are_drawn_where_they_are():
    image = np.full((8, 8, 3), 200, np.uint8)
    mask = np.zeros((8, 8), bool)
    mask[2:5, 3:6] = True
    drawn = np.asarray(Image.open(io.BytesIO(_outlined(image, mask))))
    k = drawn.shape[1] // 8
    marked = (drawn == OUTLINE).all(axis=2)
    # the outline runs along the mask's own edge pixels, inside it, one pixel wide
    rows, columns = np.nonzero(marked)
    assert (rows.min(), rows.max()) == (2 * k, 5 * k - 1)
    assert (columns.min(), columns.max()) == (3 * k, 6 * k - 1)
    assert not marked[2 * k + 1, 3 * k + 1 : 6 * k - 1].any()
    # outpainted 8 columns on the right: the canvas's right edge is marked, the image's edges not
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 16, 3), 90, np.uint8)).save(buffer, format="PNG")
    framed = np.asarray(Image.open(io.BytesIO(_result(buffer.getvalue(), "t0-r8-b0-l0"))))
    k = framed.shape[1] // 16
    marked = (framed == OUTLINE).all(axis=2)
    assert set(np.nonzero(marked)[1]) == {8 * k - 1}
    assert _result(buffer.getvalue(), None) == buffer.getvalue()


def test_an_output_evaluated_before_tasks_reports_as_before(reported_tasks, tmp_path):
    out = tmp_path / "old"
    shutil.copytree(reported_tasks["out"], out, ignore=shutil.ignore_patterns("report"))
    (out / SOURCES).unlink()
    metrics = out / "metrics"
    configs = pd.read_parquet(metrics / "configs.parquet")
    configs.drop(columns=["task", "strength", "outpaint"]).to_parquet(metrics / "configs.parquet")
    effects = pd.read_parquet(metrics / "effects.parquet")
    old = effects[~effects["axis"].isin(["task", "strength", "outpaint"])]
    old.to_parquet(metrics / "effects.parquet")
    index = write_report(str(out))
    text = (out / "report" / "report.md").read_text()
    assert index.endswith("index.html") and "## All configurations: test" in text
    assert "Image-conditioned" not in text and "strength" not in text
    assert not list((out / "report").glob("*vs_strength.png"))
    assert not (out / "report" / "sources.png").exists()
    assert pq.read_schema(metrics / "configs.parquet").get_field_index("strength") == -1
