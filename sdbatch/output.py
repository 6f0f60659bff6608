"""The output: a Parquet image dataset plus the records that make a run resumable.

Layout of an output location (a local folder or any fsspec URI such as s3://bucket/run):

    images/UNIT.parquet   the dataset: one file per work unit; pyarrow, pandas, Ray Data and
                          Hugging Face `datasets` read the folder as one table
    run.json              the resolved spec, library versions and the model's identity
    prompts.parquet       the prompt set the run used
    _units/UNIT.json      done markers: a unit is done only once its marker exists
    _tmp/                 files being written; readers never look here
    metrics/              the evaluation stage's tables (see sdbatch.evaluation)

A unit commits in three steps: write under _tmp/, move into images/, then write its marker. A crash
at any point leaves either nothing visible or a complete file; files without a marker are removed
before the next run plans its work, so no row is ever duplicated.
"""

from __future__ import annotations

import dataclasses
import posixpath
import uuid
from collections.abc import Callable

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sdbatch.errors import InputError
from sdbatch.publish import publish
from sdbatch.records import RunRecord, UnitMarker

IMAGES = "images"
UNITS = "_units"
TMP = "_tmp"
RUN = "run.json"
PROMPTS = "prompts.parquet"
METRICS_DIR = "metrics"
OWNED = (IMAGES, UNITS, TMP, RUN, PROMPTS, METRICS_DIR)
ROWS_PER_ROW_GROUP = 64  # ~25 MB of 512x512 PNGs: small enough for readers to stream


class Output:
    """An output location and the operations on its layout."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = fsspec.core.url_to_fs(uri)

    @property
    def location(self) -> str:
        """The same place from every process: an absolute path, or the URI of remote storage."""
        return self.root if "file" in self.fs.protocol else self.fs.unstrip_protocol(self.root)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def is_empty(self) -> bool:
        return not self.fs.exists(self.root) or not self.fs.ls(self.root)

    def check_writable(self) -> None:
        """Write and delete a probe file under _tmp/, so that a location nothing can be written to
        fails before any work; raises the OSError. The location is left as it was found."""
        made = None  # the outermost folder the probe creates
        folder = self.path(TMP)
        while folder and not self.fs.exists(folder):
            made, folder = folder, posixpath.dirname(folder)
        probe = self.path(TMP, f"{uuid.uuid4().hex}-probe")
        try:
            self.fs.makedirs(self.path(TMP), exist_ok=True)
            self.fs.pipe_file(probe, b"")
            self.fs.rm(probe)
        finally:
            if made is not None and self.fs.exists(made):
                self.fs.rm(made, recursive=True)

    def read_run(self) -> RunRecord | None:
        """The run record, or None for a location sdbatch has not written to.

        Raises:
            InputError: run.json is there but is not a run record sdbatch can read.
        """
        path = self.path(RUN)
        if not self.fs.exists(path):
            return None
        try:
            return RunRecord.from_json(self.fs.cat_file(path))
        except (InputError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"OUT: {path} is not a run record sdbatch reads ({e})") from None

    def write_run(self, run: RunRecord) -> None:
        body = run.to_json()
        self._publish(lambda tmp: self.fs.pipe_file(tmp, body), self.path(RUN))

    def read_prompts(self) -> pd.DataFrame:
        with self.fs.open(self.path(PROMPTS), "rb") as f:
            return pq.read_table(f).to_pandas()

    def write_prompts(self, prompts: pd.DataFrame) -> None:
        table = pa.Table.from_pandas(prompts, preserve_index=False)
        self._publish(
            lambda tmp: pq.write_table(table, tmp, filesystem=self.fs), self.path(PROMPTS)
        )

    def done_units(self) -> list[UnitMarker]:
        """The markers of committed units (one small JSON read each, fetched together)."""
        folder = self.path(UNITS)
        if not self.fs.exists(folder):
            return []
        paths = [p for p in self.fs.ls(folder, detail=False) if p.endswith(".json")]
        markers = []
        for body in self.fs.cat(paths, on_error="omit").values():
            try:
                markers.append(UnitMarker.from_json(body))
            except (InputError, ValueError, TypeError):
                continue  # never written whole; the unit is simply redone
        return markers

    def remove_orphans(self, markers: list[UnitMarker]) -> int:
        """Delete image files no marker claims (a crash between publish and mark) and _tmp/."""
        claimed = {_basename(m.file) for m in markers}
        images = self.path(IMAGES)
        present = self.fs.ls(images, detail=False) if self.fs.exists(images) else []
        orphans = [p for p in present if _basename(p) not in claimed]
        for path in orphans:
            self.fs.rm(path)
        if self.fs.exists(self.path(TMP)):
            self.fs.rm(self.path(TMP), recursive=True)
        return len(orphans)

    def clear(self) -> None:
        """Remove everything sdbatch wrote here (for --overwrite); nothing else is touched."""
        for name in OWNED:
            if self.fs.exists(self.path(name)):
                self.fs.rm(self.path(name), recursive=True)

    def commit_unit(self, table: pa.Table, marker: UnitMarker) -> UnitMarker:
        """Publish a unit's images, then mark it done (the marker is the commit); returns the
        marker with its file."""
        file = f"{IMAGES}/{marker.unit_id}.parquet"
        self._publish(
            lambda tmp: pq.write_table(
                table, tmp, filesystem=self.fs, row_group_size=ROWS_PER_ROW_GROUP
            ),
            self.path(file),
        )
        marker = dataclasses.replace(marker, file=file)
        body = marker.to_json()
        self._publish(
            lambda tmp: self.fs.pipe_file(tmp, body), self.path(UNITS, f"{marker.unit_id}.json")
        )
        return marker

    def put(self, relative: str, write: Callable[[str], None]) -> None:
        """Publish the file at `relative` (e.g. metrics/configs.csv) that `write(path)` writes."""
        self._publish(write, self.path(relative))

    def _publish(self, write: Callable[[str], None], final: str) -> None:
        self.fs.makedirs(self.path(TMP), exist_ok=True)
        publish(self.fs, write, final, self.path(TMP, f"{uuid.uuid4().hex}-{_basename(final)}"))


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]
