"""What a report is made of: sections (sentences and a table), figures (PNGs), and galleries of
images (figures under a heading)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd


@dataclass
class Section:
    title: str
    lines: list[str]  # sentences (Markdown-ish: `code` and **bold** only)
    table: pd.DataFrame | None = None
    appendix: bool = False  # reference material: after the plots and images


@dataclass
class Figure:
    name: str  # file name, e.g. fid_vs_guidance.png
    title: str
    png: bytes


@dataclass
class Gallery:
    title: str
    lines: list[str]  # what the images show and how they were chosen
    figures: list[Figure]
