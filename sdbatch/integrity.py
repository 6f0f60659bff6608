"""Committed units checked against their markers: a rerun, eval and `sdbatch verify` trust a unit
only when its file is there, whole, and made by this run.

The quick check costs one listing of images/ (sizes); the full one reads and hashes every file.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from sdbatch.errors import InputError
from sdbatch.lease import Holder, read_holder
from sdbatch.output import Output
from sdbatch.records import UnitMarker


@dataclass(frozen=True)
class Problem:
    """A committed unit that cannot be trusted, and why (a short phrase)."""

    marker: UnitMarker
    what: str

    def describe(self) -> str:
        return f"{self.marker.file or self.marker.unit_id}: {self.what}"


def unit_problems(
    out: Output, markers: list[UnitMarker], identity: str | None, full: bool = False
) -> list[Problem]:
    """The units among `markers` whose file is missing, of the wrong size or (when `full`) of the
    wrong sha256 or unreadable, made under another run identity than `identity` (None: any), or
    claiming an image another unit already holds."""
    sizes = out.image_sizes()
    problems = []
    claimed: Counter[tuple[str, str]] = Counter()
    for marker in sorted(markers, key=lambda m: m.unit_id):
        what = _file_problem(out, marker, sizes, full)
        if what is None and identity is not None and marker.run and marker.run != identity:
            what = f"made by another run (identity {marker.run}, this run's is {identity})"
        keys = [(marker.config_id, pid) for pid in marker.prompt_ids]
        if what is None and any(claimed[key] for key in keys):
            what = "holds images another unit holds too"
        if what is None:
            claimed.update(keys)
        else:
            problems.append(Problem(marker, what))
    return problems


def summarize(problems: list[Problem]) -> str:
    """One line for any number of problems: how many, and the first."""
    first = problems[0].describe()
    if len(problems) == 1:
        return first
    return f"{len(problems)} units do not match their markers (first {first})"


@dataclass(frozen=True)
class VerifyReport:
    """What `sdbatch verify` found: a rerun redoes the units with problems, and removes files no
    marker claims and what was left under _tmp/."""

    output: str
    units: int
    images: int
    problems: tuple[Problem, ...]
    unclaimed_files: tuple[str, ...]
    holder: Holder | None  # the driver holding the output now, if any

    @property
    def clean(self) -> bool:
        return not self.problems and not self.unclaimed_files


def verify(output: str, *, full: bool = True) -> VerifyReport:
    """Check every committed unit of `output` against its marker (hashing every file unless not
    `full`), as a rerun would, and change nothing.

    Raises:
        InputError: `output` holds no sdbatch run.
    """
    out = Output(output)
    run = out.read_run()
    if run is None:
        raise InputError(f"OUT: {out.uri} holds no sdbatch run.json")
    markers = out.done_units()
    problems = unit_problems(out, markers, run.identity, full)
    claimed = {m.file for m in markers}
    return VerifyReport(
        output=out.location,
        units=len(markers),
        images=sum(m.images for m in markers),
        problems=tuple(problems),
        unclaimed_files=tuple(sorted(set(out.image_sizes()) - claimed)),
        holder=read_holder(out.fs, out.root),
    )


def _file_problem(out: Output, marker: UnitMarker, sizes: dict[str, int], full: bool) -> str | None:
    if marker.file not in sizes:
        return "missing"
    if marker.bytes and sizes[marker.file] != marker.bytes:
        return f"{sizes[marker.file]:,} bytes, its marker says {marker.bytes:,}"
    if not full:
        return None
    body = out.fs.cat_file(out.path(marker.file))
    if marker.sha256:
        return None if hashlib.sha256(body).hexdigest() == marker.sha256 else "sha256 differs"
    # A marker of sdbatch 0.1 has no hash: the file must at least be the Parquet it claims.
    try:
        rows = pq.ParquetFile(pa.BufferReader(body)).metadata.num_rows
    except Exception as e:  # pyarrow raises several types for a damaged file
        return f"not a readable Parquet file ({type(e).__name__})"
    return None if rows == marker.images else f"{rows} rows, its marker says {marker.images}"
