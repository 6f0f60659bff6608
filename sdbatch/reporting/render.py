"""The report's two renderings of the same sections, figures and galleries: one self-contained HTML
page (images inlined as data: URIs, nothing fetched; one small inline script makes the tables
sortable, and the page reads the same without it) and Markdown that links the PNGs written beside
it, for a PR or a wiki. The answers come first, then plots and images, then the reference tables."""

from __future__ import annotations

import base64
import html

import pandas as pd

from sdbatch.reporting.parts import Figure, Gallery, Section
from sdbatch.reporting.runs import Run


def markdown(
    runs: list[Run], sections: list[Section], figures: list[Figure], galleries: list[Gallery]
) -> str:
    """report.md: the sections, then the figures and galleries as links to the PNGs beside it."""
    parts = [f"# sdbatch report: {' vs '.join(run.name for run in runs)}", ""]
    answers, appendix = _split(sections)

    def add(section: Section) -> None:
        parts.extend([f"## {section.title}", "", *(f"- {line}" for line in section.lines)])
        if section.table is not None:
            parts.extend(["", _markdown_table(section.table)])
        parts.append("")

    for section in answers:
        add(section)
    parts += ["## Plots", ""] + [f"![{f.title}]({f.name})" for f in figures]
    for gallery in galleries:
        parts += ["", f"## {gallery.title}", ""] + [f"- {line}" for line in gallery.lines]
        for f in gallery.figures:
            parts += ["", f"**{f.title}**", "", f"![{f.title}]({f.name})"]
    parts.append("")
    for section in appendix:
        add(section)
    return "\n".join(parts) + "\n"


def _split(sections: list[Section]) -> tuple[list[Section], list[Section]]:
    """The answers, which go before the plots and images, and the appendix, which goes after."""
    return [s for s in sections if not s.appendix], [s for s in sections if s.appendix]


def _markdown_table(table: pd.DataFrame) -> str:
    cells = lambda row: "| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |"  # noqa: E731
    lines = [cells(table.columns), "|" + "---|" * len(table.columns)]
    return "\n".join(lines + [cells(row) for row in table.itertuples(index=False)])


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; font-size: 13px; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f3f3f3; }
figure { margin: 1em 0; }
figcaption { font-size: 13px; color: #555; }
img { max-width: 100%; }
/* narrow images two to a row (scaled a little if need be); a caption as wide as its image */
figure.half { display: inline-block; vertical-align: top; max-width: calc(50% - 1.5em);
              margin: 0 1.5em 1em 0; }
figure.half figcaption { width: 0; min-width: 100%; }
table.sortable th { cursor: pointer; }
"""

# Click a header to sort its table by that column (numbers by their leading value), again to
# reverse. Without scripts the tables stay in their written order.
SORT_SCRIPT = """
for (const th of document.querySelectorAll("table.sortable thead th")) {
  th.title = "click to sort";
  th.addEventListener("click", () => {
    const body = th.closest("table").tBodies[0];
    const column = th.cellIndex, up = th.dataset.order !== "up";
    th.dataset.order = up ? "up" : "down";
    const key = (row) => {
      const text = row.cells[column].textContent.trim(), number = parseFloat(text);
      return Number.isNaN(number) ? text : number;
    };
    const rows = [...body.rows].sort((a, b) => {
      const x = key(a), y = key(b);
      const order = typeof x === "number" && typeof y === "number"
        ? x - y : String(x).localeCompare(String(y));
      return up ? order : -order;
    });
    body.append(...rows);
  });
}
"""


def page(
    runs: list[Run], sections: list[Section], figures: list[Figure], galleries: list[Gallery]
) -> str:
    """index.html: the same, one self-contained file."""
    title = f"sdbatch report: {' vs '.join(run.name for run in runs)}"
    body = [f"<h1>{html.escape(title)}</h1>"]
    answers, appendix = _split(sections)

    def add(section: Section) -> None:
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        body.append(_bullets(section.lines))
        if section.table is not None:
            body.append(
                section.table.to_html(index=False, border=0, escape=True, classes="sortable")
            )

    for section in answers:
        add(section)
    body.append("<h2>Plots</h2>")
    body += [_figure(f, "plot") for f in figures]
    for gallery in galleries:
        body.append(f"<h2>{html.escape(gallery.title)}</h2>")
        body.append(_bullets(gallery.lines))
        body += [
            _figure(f, "grid half" if _width(f.png) <= HALF else "grid") for f in gallery.figures
        ]
    for section in appendix:
        add(section)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
        f"<body>{''.join(body)}<script>{SORT_SCRIPT}</script></body></html>\n"
    )


# Widest image shown two to a row: at most a tenth smaller than drawn on the 1100 px page.
HALF = 600


def _width(png: bytes) -> int:
    """A PNG's width in pixels, from its header (IHDR comes first)."""
    return int.from_bytes(png[16:20], "big")


def _figure(figure: Figure, kind: str) -> str:
    data = base64.b64encode(figure.png).decode()
    caption = html.escape(figure.title)
    return (
        f'<figure class="{kind}"><img alt="{caption}" src="data:image/png;base64,{data}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _bullets(lines: list[str]) -> str:
    """Sentences as a list; nothing for none."""
    return f"<ul>{''.join(f'<li>{_inline(line)}</li>' for line in lines)}</ul>" if lines else ""


def _inline(line: str) -> str:
    """Escape a sentence, then render its `code` and **bold** spans."""
    text = html.escape(line)
    for mark, tag in (("**", "strong"), ("`", "code")):
        pieces = text.split(mark)
        text = "".join(
            piece if i % 2 == 0 else f"<{tag}>{piece}</{tag}>" for i, piece in enumerate(pieces)
        )
    return text
