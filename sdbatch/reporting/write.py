"""`sdbatch report`: OUT/metrics and the images -> OUT/report/index.html and OUT/report/report.md.

Given two outputs A and B, every plot shows both runs and a table gives the per-configuration
differences; the comparison goes into A/report/vs-B/ (B's run name), beside A's own report.
"""

from __future__ import annotations

from collections.abc import Sequence

from sdbatch.errors import InputError
from sdbatch.reporting.grids import GRID_PROMPTS, galleries
from sdbatch.reporting.plots import plots
from sdbatch.reporting.render import markdown, page
from sdbatch.reporting.runs import load_run
from sdbatch.reporting.summary import sections
from sdbatch.reporting.tasks import source_galleries, task_figures, task_sections

REPORT = "report"


def write_report(
    outputs: str | Sequence[str],
    *,
    prompts: int | Sequence[str] = GRID_PROMPTS,
    prompt: str | None = None,
) -> str:
    """Write the report of one output into OUT/report, or the comparison of two into
    A/report/vs-B; returns the path of its index.html.

    `prompts`: how many prompts the image grids show, spread across the prompt set, or which
    (prompt ids). `prompt`: a prompt id whose every image (each configuration, each sample)
    the report shows.

    Raises:
        InputError: an output has no metrics, more than two are given, or a prompt id is not
        in the run.
    """
    locations = [outputs] if isinstance(outputs, str) else list(outputs)
    if not 1 <= len(locations) <= 2:
        raise InputError("OUT: give one output, or two to compare")
    # 1. read every run's metrics; two runs with the same name get their folder names
    runs = [load_run(location) for location in locations]
    if len(runs) == 2 and runs[0].name == runs[1].name:
        for run in runs:
            run.name = run.out.location.rstrip("/").rsplit("/", 1)[-1]
    # 2. plots, image galleries and tables
    named = len(runs) > 1
    shown = [
        g
        for run in runs
        for g in (*source_galleries(run, named, prompts), *galleries(run, named, prompts, prompt))
    ]
    figures, missing = plots(runs)
    figures += task_figures(runs)
    parts = sections(runs, missing)
    parts[1:1] = [s for run in runs for s in task_sections(run)]
    # 3. write the PNGs, then the Markdown, then index.html last
    out = runs[0].out
    folder = REPORT if len(runs) == 1 else f"{REPORT}/vs-{runs[1].name}"
    pngs = [*figures, *(f for gallery in shown for f in gallery.figures)]
    for figure in pngs:
        out.put(f"{folder}/{figure.name}", lambda tmp, png=figure.png: out.fs.pipe_file(tmp, png))
    text = markdown(runs, parts, figures, shown).encode()
    out.put(f"{folder}/report.md", lambda tmp: out.fs.pipe_file(tmp, text))
    html = page(runs, parts, figures, shown).encode()
    out.put(f"{folder}/index.html", lambda tmp: out.fs.pipe_file(tmp, html))
    return f"{out.location}/{folder}/index.html"
