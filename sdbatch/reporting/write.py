"""`sdbatch report`: OUT/metrics and the images -> OUT/report/index.html and OUT/report/report.md.

Given two outputs, every plot shows both runs and a table gives the per-configuration
differences, saying whether the confidence intervals overlap; the report goes into the first.
"""

from __future__ import annotations

from collections.abc import Sequence

from sdbatch.errors import InputError
from sdbatch.reporting.grids import grids
from sdbatch.reporting.plots import plots
from sdbatch.reporting.render import markdown, page
from sdbatch.reporting.runs import load_run
from sdbatch.reporting.summary import sections

REPORT = "report"


def write_report(outputs: str | Sequence[str]) -> str:
    """Write the report of one output (or a comparison of two) into the first; returns the path
    of its index.html.

    Raises:
        InputError: an output has no metrics, or more than two are given.
    """
    locations = [outputs] if isinstance(outputs, str) else list(outputs)
    if not 1 <= len(locations) <= 2:
        raise InputError("OUT: give one output, or two to compare")
    # 1. read every run's metrics; two runs with the same name get their folder names
    runs = [load_run(location) for location in locations]
    if len(runs) == 2 and runs[0].name == runs[1].name:
        for run in runs:
            run.name = run.out.location.rstrip("/").rsplit("/", 1)[-1]
    # 2. plots, image grids and tables
    figures, missing = plots(runs)
    images = [grid for run in runs for grid in grids(run, len(runs) > 1)]
    parts = sections(runs, missing)
    # 3. write the PNGs, then the Markdown, then index.html last
    out = runs[0].out
    for figure in [*figures, *images]:
        out.put(f"{REPORT}/{figure.name}", lambda tmp, png=figure.png: out.fs.pipe_file(tmp, png))
    text = markdown(runs, parts, figures, images).encode()
    out.put(f"{REPORT}/report.md", lambda tmp: out.fs.pipe_file(tmp, text))
    html = page(runs, parts, figures, images).encode()
    out.put(f"{REPORT}/index.html", lambda tmp: out.fs.pipe_file(tmp, html))
    path = f"{out.location}/{REPORT}/index.html"
    return path
