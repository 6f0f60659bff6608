"""The report: contents a user reads, a self-contained page that renders in a real browser,
comparisons of two runs, and runs with missing pieces."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import job, suite_data
from PIL import Image

from sdbatch.cli import main as cli_main
from sdbatch.errors import InputError
from sdbatch.evaluation.registry import ranked_metrics
from sdbatch.evaluation.run import evaluate
from sdbatch.evaluation.suite import parse_suite
from sdbatch.generation import generate
from sdbatch.reporting.runs import Run
from sdbatch.reporting.summary import label, pareto_front, recommendation
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


class Tables(HTMLParser):
    """The page's tables, each under the last heading before it, as rows of cell texts."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.heading, self.cell = "", None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables[self.heading] = []
        elif tag == "tr":
            self.tables[self.heading].append([])
        elif tag in ("td", "th", "h2"):
            self.cell = ""

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data

    def handle_endtag(self, tag):
        if tag == "h2":
            self.heading = self.cell
        elif tag in ("td", "th"):
            self.tables[self.heading][-1].append(self.cell.strip())
        if tag in ("td", "th", "h2"):
            self.cell = None

    def column(self, heading: str, name: str) -> list[str]:
        header, *rows = self.tables[heading]
        return [row[header.index(name)] for row in rows]


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
    # what the suite left out is named once, with what is plotted
    absent = ", ".join(m.label for m in ranked_metrics() if m.name not in ("clip_score", "fid"))
    shown = f"Not computed by the suite, so not plotted: {absent} (the plots show CLIP score, FID)."
    assert shown in markdown


def test_pareto_front_is_the_undominated_set():
    configs = pd.DataFrame({"fid": [1.0, 2.0, 3.0, 2.5], "clip_score": [20.0, 30.0, 31.0, 25.0]})
    # the last is beaten on both by the second
    assert pareto_front(configs).tolist() == [True, True, True, False]


def test_html_is_self_contained(reported):
    out, _ = reported
    page = Page((out / "report" / "index.html").read_text())
    assert page.links == []  # no stylesheet, script or link to fetch
    # FID and CLIP score: main effects and vs guidance; the trade-off; 4 grids; the worst images
    assert len(page.images) == 5 + 4 + 1
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


def _shift(folder, column: str, by) -> None:
    """Add `by` to `column` (and its interval) in configs.parquet and replicates.parquet."""
    for name, columns in (("configs", (column, f"{column}_low", f"{column}_high")),
                          ("replicates", (column,))):  # fmt: skip
        path = folder / "metrics" / f"{name}.parquet"
        table = pq.read_table(path).to_pandas()
        for c in columns:
            table[c] += by(table) if callable(by) else by
        pq.write_table(pa.Table.from_pandas(table, preserve_index=False), path)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run does)")
def test_page_leads_with_the_answer_and_its_tables_sort_in_chromium(reported, tmp_path):
    _, path = reported
    text = Path(path).read_text()
    column = "UNet evals/image"
    # click the header of the configurations table's cost column twice: descending order
    click = (
        "<script>for (const th of document.querySelectorAll('th')) "
        f"if (th.textContent === '{column}') {{ th.click(); th.click(); }}</script>"
    )
    clicked = tmp_path / "clicked.html"
    clicked.write_text(text.replace("</body>", click + "</body>"))
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
         f"file://{clicked}"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    headings = re.findall(r"<h2>([^<]*)</h2>", dom)
    assert headings[:3] == [
        "Recommendation: test",
        "Best by each metric: test",
        "Main effects: test",
    ]
    assert headings.index("Plots") < headings.index("All configurations: test")
    written, sorted_ = (
        Tables(page).column("All configurations: test", column) for page in (text, dom)
    )
    assert sorted_ == sorted(written, key=float, reverse=True) and sorted_ != written


def test_two_runs_are_compared_per_configuration_with_paired_intervals(evaluated_output, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(evaluated_output["out"], a)
    shutil.copytree(evaluated_output["out"], b)
    # B: a model whose FID is 1000 worse everywhere and CLIP score the same; the same prompts
    # and bootstrap draws, so every difference pairs
    _shift(b, "fid", 1000.0)

    path = write_report([str(a), str(b)])
    assert path == f"{a}/report/vs-b/index.html"
    assert not (a / "report" / "index.html").exists()  # A's own report is not replaced
    markdown = (a / "report" / "vs-b" / "report.md").read_text()
    assert "## Comparison: a vs b" in markdown and "paired:" in markdown
    rows = [line for line in markdown.splitlines() if "+1000.00 [+1000.00, +1000.00]" in line]
    assert len(rows) == 4
    assert all("| a better |" in r and "+0.00 [+0.00, +0.00] | no clear difference |" in r
               for r in rows)  # fmt: skip
    page = Page((a / "report" / "vs-b" / "index.html").read_text())
    assert len(page.images) == 5 + 2 * (4 + 1)  # the same plots with both runs; both runs' images

    # draws that do not pair: only whether the intervals overlap can be said
    record = json.loads((b / "metrics" / "metrics.json").read_text())
    record["bootstrap_draws"] = "sha256:other"
    (b / "metrics" / "metrics.json").write_text(json.dumps(record))
    write_report([str(a), str(b)])
    markdown = (a / "report" / "vs-b" / "report.md").read_text()
    assert "do not pair" in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and "+1000.00" in line]
    assert len(rows) == 4
    assert all("| differ |" in row and "| overlap |" in row for row in rows)


def test_paired_two_run_interval_equals_a_direct_percentile(evaluated_output, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(evaluated_output["out"], a)
    shutil.copytree(evaluated_output["out"], b)
    rng = np.random.default_rng(3)
    _shift(b, "clip_score", lambda table: 0.5 + rng.normal(0, 0.2, len(table)))
    write_report([str(a), str(b)])
    markdown = (a / "report" / "vs-b" / "report.md").read_text()
    ca = pd.read_parquet(a / "metrics" / "configs.parquet").set_index("config_id")
    cb = pd.read_parquet(b / "metrics" / "configs.parquet").set_index("config_id")
    ra, rb = (pd.read_parquet(x / "metrics" / "replicates.parquet") for x in (a, b))
    alpha = 0.05 / len(ca)  # four configurations' intervals together
    for config_id in ca.index:
        drawn = [r[r["config_id"] == config_id].sort_values("replicate")["clip_score"].to_numpy()
                 for r in (ra, rb)]  # fmt: skip
        low, high = np.quantile(drawn[1] - drawn[0], [alpha / 2, 1 - alpha / 2])
        difference = cb.loc[config_id, "clip_score"] - ca.loc[config_id, "clip_score"]
        assert f"{difference:+.2f} [{low:+.2f}, {high:+.2f}]" in markdown


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
    assert "A single configuration: there is nothing to plot against." in markdown
    assert "so not plotted" not in markdown  # nothing would be, whatever the suite computed
    assert "Best by CLIP score" in markdown and "Best by FID" not in markdown
    page = Page((out / "report" / "index.html").read_text())
    assert path == f"{out}/report/index.html"
    assert len(page.images) == 2 + 1  # no plots; one grid per prompt; the worst CLIP scores


def test_report_needs_metrics(tmp_path, evaluated_output):
    shutil.copytree(
        evaluated_output["out"], tmp_path / "out", ignore=shutil.ignore_patterns("metrics")
    )
    with pytest.raises(InputError, match="run sdbatch eval first"):
        write_report([str(tmp_path / "out")])
    assert cli_main(["report", str(tmp_path / "out")]) == 2


def _synthetic_run(worse: dict[str, set[str]], bests: dict[str, str]) -> Run:
    """Four configurations costing 3, 6, 20 and 40 model evaluations; per metric its best and
    the configurations its paired differences flag as worse."""
    configs = pd.DataFrame({
        "config_id": ["a", "b", "c", "d"], "scheduler": ["euler"] * 4,
        "num_inference_steps": [3, 3, 10, 20], "guidance_scale": [1.0, 2.0, 2.0, 2.0],
        "unet_evals_per_image": [3, 6, 20, 40], "seconds_per_image_median": [0.1] * 4,
        "seconds_per_image_q1": [0.1] * 4, "seconds_per_image_q3": [0.1] * 4,
        "clip_score": [20.0, 25.0, 29.0, 30.0], "fid": [9.0, 12.0, 5.0, 6.0],
    })  # fmt: skip
    rows = []
    for column, direction in (("clip_score", -1), ("fid", 1)):  # the worse side's sign
        for other in "abcd":
            if other == bests[column]:
                continue
            flagged = other in worse[column]
            # an interval wholly on the worse side when flagged, else one that reaches zero
            low, high = sorted((direction * 1.0, direction * (0.5 if flagged else -0.5)))
            rows.append({
                "column": column, "best": bests[column], "other": other, "worse": flagged,
                "difference": direction * 0.75, "low": low, "high": high,
                "family_confidence": 0.95, "confidence": 1 - 0.05 / 3, "comparisons": 3,
            })  # fmt: skip
    return Run("synthetic", None, configs, None, None, pd.DataFrame(rows))


def _expected_cheapest(run: Run) -> str | None:
    """Straight from the definition: not flagged worse by any metric, then fewest evaluations."""
    d = run.differences
    flagged = set(d.loc[d["worse"], "other"])
    close = run.configs[~run.configs["config_id"].isin(flagged)]
    return None if close.empty else close.sort_values("unet_evals_per_image")["config_id"].iloc[0]


@pytest.mark.parametrize(
    ("worse", "expected"),
    [
        ({"clip_score": {"a"}, "fid": {"b"}}, "c"),  # b is worse by FID, a by CLIP score
        ({"clip_score": set(), "fid": set()}, "a"),  # nothing is clearly worse: the cheapest
        ({"clip_score": {"a", "b", "c"}, "fid": {"d", "a", "b"}}, None),  # no common ground
    ],
)
def test_recommendation_is_the_cheapest_configuration_not_clearly_worse(worse, expected):
    run = _synthetic_run(worse, {"clip_score": "d", "fid": "c"})
    assert _expected_cheapest(run) == expected
    section = recommendation(run)
    assert section.title == "Recommendation: synthetic"
    quality, alignment, cheapest, how = section.lines
    assert quality.startswith("For image quality: **euler, 10 steps, guidance 2** (best by FID")
    assert alignment.startswith("For prompt alignment: **euler, 20 steps, guidance 2**")
    if expected is None:
        assert cheapest.startswith("No configuration is close to the best by all of")
        assert (
            "by CLIP score, euler, 20 steps" in cheapest and "by FID, euler, 10 steps" in cheapest
        )
    else:
        row = run.configs.set_index("config_id").loc[expected]
        assert f"**{label(row)}**, {row['unet_evals_per_image']} UNet evaluations/image" in cheapest
        assert cheapest.startswith("Cheapest not clearly worse than the best by any of")
    assert "Bonferroni" in how


def test_main_effects_say_what_effects_parquet_holds(reported):
    out, _ = reported
    markdown = (out / "report" / "report.md").read_text()
    effects = pd.read_parquet(out / "metrics" / "effects.parquet")
    names = {"clip_score": "CLIP score", "fid": "FID"}
    assert "## Main effects: test" in markdown
    for _, e in effects[effects["column"].isin(names) & effects["difference"].notna()].iterrows():
        shift = f"{e['difference']:+.2f} [{e['difference_low']:+.2f}, {e['difference_high']:+.2f}]"
        assert shift in markdown  # in the table, and in the sentence when it is clear
        clear = e["difference_low"] > 0 or e["difference_high"] < 0
        assert (f"{names[e['column']]} {shift}" in markdown) == clear
