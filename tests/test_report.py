"""The report: contents a user reads, a self-contained page that renders in a real browser,
comparisons of two runs, and runs with missing pieces."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import job, suite_data
from PIL import Image

from sdbatch.cli import main as cli_main
from sdbatch.errors import InputError
from sdbatch.evaluation.run import evaluate
from sdbatch.evaluation.suite import parse_suite
from sdbatch.generation import generate
from sdbatch.reporting.summary import pareto_front
from sdbatch.reporting.write import write_report
from sdbatch.spec import parse_spec

CHROMIUM = shutil.which("chromium")
MATPLOTLIB_BLUE = (31, 119, 180)  # the first line of every plot


class Page(HTMLParser):
    """The page's images and links, as a browser would fetch them."""

    def __init__(self, text: str):
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.links: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        for name in ("href", "src"):
            if name in attrs and tag != "img":
                self.links.append(attrs[name])


@pytest.fixture(scope="module")
def reported(evaluated_output, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "out"
    shutil.copytree(evaluated_output["out"], out)
    path = write_report([str(out)])
    return out, path


def test_report_names_the_best_configurations(reported):
    out, path = reported
    assert path == f"{out}/report/index.html"
    configs = pd.read_parquet(out / "metrics" / "configs.parquet")
    markdown = (out / "report" / "report.md").read_text()
    best_fid = configs.loc[configs["fid"].idxmin(), "config_id"]
    best_clip = configs.loc[configs["clip_score"].idxmax(), "config_id"]
    assert re.search(rf"Best by FID: .*`{best_fid}`", markdown)
    assert re.search(rf"Best by CLIP score: .*`{best_clip}`", markdown)
    # the runner-up is judged by the paired difference the evaluation stored, not by overlap
    differences = pd.read_parquet(out / "metrics" / "differences.parquet")
    for column, best in (("fid", best_fid), ("clip_score", best_clip)):
        rows = differences[(differences["column"] == column) & (differences["best"] == best)]
        rows = rows.set_index("other")
        values = rows["other_value"]
        second = rows.loc[values.idxmin() if column == "fid" else values.idxmax()]
        verdict = "clearly better" if second["worse"] else "not clearly better"
        paired = (
            f"paired difference {second['difference']:+.3g} [{second['low']:+.3g}, "
            f"{second['high']:+.3g}] (95% together over {len(rows)} comparisons with the best): "
            f"{verdict}."
        )
        assert paired in markdown, paired
    # cost in model evaluations (2 steps, doubled by guidance), then the measured time
    evals = configs.set_index("config_id")["unet_evals_per_image"]
    assert evals[best_fid] == (4 if "-g7.5-" in best_fid else 2)
    assert re.search(
        rf"`{best_fid}`\), [^\n]*, {evals[best_fid]} UNet evaluations/image, ", markdown
    )
    assert "leaving out warm-up" in markdown
    for config_id in configs["config_id"]:
        assert f"| {config_id} |" in markdown
    front = configs[pareto_front(configs)]
    assert best_fid in set(front["config_id"]) and best_clip in set(front["config_id"])
    for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown):
        Image.open(out / "report" / name).verify()
    assert "builtin:tiny-clip" in markdown and "clip-processor-pil" in markdown


def test_pareto_front_is_the_undominated_set():
    configs = pd.DataFrame({"fid": [1.0, 2.0, 3.0, 2.5], "clip_score": [20.0, 30.0, 31.0, 25.0]})
    # the last is beaten on both by the second
    assert pareto_front(configs).tolist() == [True, True, True, False]


def test_html_is_self_contained(reported):
    out, _ = reported
    page = Page((out / "report" / "index.html").read_text())
    assert page.links == []  # no stylesheet, script or link to fetch
    assert len(page.images) == 5 + 4  # FID, CLIP main effects and vs guidance; trade-off; 4 grids
    for image in page.images:
        assert image["src"].startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(image["src"].split(",", 1)[1]))).verify()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run does)")
def test_page_renders_in_headless_chromium_without_console_errors(reported, tmp_path):
    _, path = reported
    shot = tmp_path / "page.png"
    result = subprocess.run(
        [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
            "--v=0", "--window-size=1200,6000", f"--screenshot={shot}", f"file://{path}",
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # plots: matplotlib's first line color is on the page
    blue = (np.abs(pixels - MATPLOTLIB_BLUE).sum(axis=2) < 10).sum()
    assert blue > 200  # a line across each plot; none at all if a plot did not render
    # grids: 4 prompts x 128 px rows that are mostly colored pixels (the generated images);
    # plots, text and tables have no such rows
    colorful = pixels.std(axis=2) > 20
    rows = np.flatnonzero(colorful.sum(axis=1) > 100)
    assert len(rows) > 3 * 128


def test_two_runs_are_compared_per_configuration(evaluated_output, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(evaluated_output["out"], a)
    shutil.copytree(evaluated_output["out"], b)
    # B: a model whose FID is 1000 worse everywhere and CLIP score the same
    table = pq.read_table(b / "metrics" / "configs.parquet").to_pandas()
    for column in ("fid", "fid_low", "fid_high"):
        table[column] += 1000
    pq.write_table(
        pa.Table.from_pandas(table, preserve_index=False), b / "metrics" / "configs.parquet"
    )

    path = write_report([str(a), str(b)])
    assert path == f"{a}/report/vs-b/index.html"
    assert not (a / "report" / "index.html").exists()  # A's own report is not replaced
    markdown = (a / "report" / "vs-b" / "report.md").read_text()
    assert "## Comparison: a vs b" in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and "+1000.00" in line]
    assert len(rows) == 4
    assert all("| differ |" in row and "| overlap |" in row for row in rows)
    page = Page((a / "report" / "vs-b" / "index.html").read_text())
    assert len(page.images) == 5 + 2 * 4  # the same plots with both runs; both runs' grids


def test_missing_fid_and_a_single_configuration(tmp_path, prompt_file, ray_address):
    data = job(prompt_file(["a red circle", "a blue square"]))
    data["sweep"] = {**data["sweep"], "scheduler": ["ddim"], "guidance_scale": [7.5]}
    out = tmp_path / "out"
    generate(parse_spec(data), output=str(out), address=ray_address)
    suite = suite_data(tmp_path / "unused", tmp_path / "cache", metrics=["clip_score"])
    del suite["reference"]
    evaluate(str(out), parse_suite(suite), address=ray_address)

    path = write_report([str(out)])
    markdown = (out / "report" / "report.md").read_text()
    assert "FID was not computed for this run" in markdown
    assert "A single configuration: there is nothing to plot against." in markdown
    assert "Best by CLIP score" in markdown and "Best by FID" not in markdown
    page = Page((out / "report" / "index.html").read_text())
    assert path == f"{out}/report/index.html"
    assert len(page.images) == 2  # no plots; one grid per prompt


def test_report_needs_metrics(tmp_path, evaluated_output):
    shutil.copytree(
        evaluated_output["out"], tmp_path / "out", ignore=shutil.ignore_patterns("metrics")
    )
    with pytest.raises(InputError, match="run sdbatch eval first"):
        write_report([str(tmp_path / "out")])
    assert cli_main(["report", str(tmp_path / "out")]) == 2
