"""The output: a Parquet image dataset plus the records that make a run resumable.

Layout of an output location (a local folder or any fsspec URI such as s3://bucket/run):

    images/UNIT.parquet   the dataset: one file per work unit; pyarrow, pandas, Ray Data and
                          Hugging Face `datasets` read the folder as one table
    run.json              the resolved spec, library versions and the model's identity
    prompts.parquet       the prompt set the run used
    sources.parquet       image-conditioned tasks: each prompt's source image (mask, depth map) as
                          the pipeline got it (see sdbatch.sources); written whole before any unit
    _units/UNIT.json      done markers: a unit is done only once its marker exists; each holds
                          its file's size and sha256, and the identity of the run that made it
    _tmp/                 files being written; readers never look here
    _lease.json           the driver that holds the output (see sdbatch.lease)
    metrics/              the evaluation stage's tables (see sdbatch.evaluation)
    _logs/                workers' library warnings, a file per worker process (see log_folder)

A unit commits in three steps: write under _tmp/, move into images/, then write its marker, each
only while the unit's run holds the lease. A crash at any point leaves either nothing visible or a
complete file; files without a marker are removed before the next run plans its work, so no row is
ever duplicated. A store that refuses a write raises StoreFailed, which stops the job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import posixpath
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sdbatch.errors import InputError, StoreFailed, first_line
from sdbatch.lease import LEASE, check_holder
from sdbatch.publish import publish
from sdbatch.records import RunRecord, UnitMarker

IMAGES = "images"
UNITS = "_units"
TMP = "_tmp"
RUN = "run.json"
PROMPTS = "prompts.parquet"
SOURCES = "sources.parquet"
METRICS_DIR = "metrics"
LOGS = "_logs"
OWNED = (IMAGES, UNITS, TMP, RUN, PROMPTS, SOURCES, METRICS_DIR, LOGS, LEASE)
# Stores private to one process: workers would write where the driver never looks.
NOT_SHARED = ("memory",)
ROWS_PER_ROW_GROUP = 64  # ~25 MB of 512x512 PNGs: small enough for readers to stream


class Output:
    """An output location and the operations on its layout."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = fsspec.core.url_to_fs(uri)

    def check_shared(self) -> None:
        """Raises: InputError for a store that worker processes cannot share."""
        private = set(NOT_SHARED) & set(_protocols(self.fs))
        if private:
            raise InputError(
                f"--out: {self.uri} is in {private.pop()}:// storage, which each process has its "
                "own copy of, so workers' images would be lost; use a folder or shared storage"
            )

    @property
    def location(self) -> str:
        """The same place from every process: an absolute path, or the URI of remote storage."""
        return self.root if "file" in _protocols(self.fs) else self.fs.unstrip_protocol(self.root)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def log_folder(self) -> str:
        """Where workers write their libraries' warnings: _logs/ of a local output; for remote
        storage, a folder named after the output in each worker machine's temporary folder."""
        if "file" in _protocols(self.fs):
            return self.path(LOGS)
        name = hashlib.sha256(self.location.encode()).hexdigest()[:12]
        return str(Path(tempfile.gettempdir()) / "sdbatch-logs" / name)

    def foreign_entries(self) -> list[str]:
        """Names at the location that sdbatch did not write (an output holds none)."""
        if not self.fs.exists(self.root):
            return []
        names = [_basename(p) for p in self.fs.ls(self.root, detail=False)]
        return sorted(name for name in names if name not in OWNED)

    def check_writable(self, size: int) -> None:
        """Write `size` bytes (about one unit's) to a probe under _tmp/ and delete them, so that a
        location that cannot take the work fails before any; raises the OSError. The location is
        left as it was found."""
        made = []  # the folders the probe creates, deepest first
        folder = self.path(TMP)
        while folder and not self.fs.exists(folder):
            made.append(folder)
            folder = posixpath.dirname(folder)
        probe = self.path(TMP, f"{uuid.uuid4().hex}-probe")
        try:
            self.fs.makedirs(self.path(TMP), exist_ok=True)
            # random, so that a compressing filesystem stores all of it
            self.fs.pipe_file(probe, os.urandom(size))
        finally:
            if self.fs.exists(probe):
                self.fs.rm(probe)
            # Object stores have no folders to leave behind. Local ones are removed only while
            # empty: another driver may have started writing into them meanwhile.
            if "file" in _protocols(self.fs):
                for folder in made:
                    try:
                        Path(folder).rmdir()
                    except OSError:
                        break

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

    def read_sources(self) -> pa.Table | None:
        """sources.parquet, or None where the run has none (text2img)."""
        path = self.path(SOURCES)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as f:
            return pq.read_table(f)

    def write_sources(self, table: pa.Table) -> None:
        self._publish(
            lambda tmp: pq.write_table(table, tmp, filesystem=self.fs), self.path(SOURCES)
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
        """Remove everything sdbatch wrote here (for --overwrite) but the lease of the run that
        clears it; nothing else is touched."""
        for name in OWNED:
            if name == LEASE:
                continue
            if self.fs.exists(self.path(name)):
                self.fs.rm(self.path(name), recursive=True)

    def commit_unit(self, table: pa.Table, marker: UnitMarker, run_id: str) -> UnitMarker:
        """Publish a unit's images, then mark it done (the marker is the commit), if run `run_id`
        still holds the output; returns the marker with its file's name, size and sha256.

        Raises:
            LeaseLost: another run holds the output now; nothing of this unit was written.
            StoreFailed: the store refused a write; nothing of this unit stays.
        """
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer, row_group_size=ROWS_PER_ROW_GROUP)
        body = buffer.getvalue().to_pybytes()
        file = f"{IMAGES}/{marker.unit_id}.parquet"
        marker = dataclasses.replace(
            marker,
            file=file,
            bytes=len(body),
            sha256=hashlib.sha256(body).hexdigest(),
            committed=time.time(),
        )
        with self._store():
            check_holder(self.fs, self.root, run_id)
        try:
            self._publish(lambda tmp: self.fs.pipe_file(tmp, body), self.path(file))
            try:
                self._publish(
                    lambda tmp: self.fs.pipe_file(tmp, marker.to_json()),
                    self.path(UNITS, f"{marker.unit_id}.json"),
                )
            except BaseException:
                with self._store():
                    self.fs.rm(self.path(file))  # a file without its marker is not done
                raise
        except StoreFailed:
            # A driver that took the output over may have cleared it under this write: then
            # that is the cause to report.
            with self._store():
                check_holder(self.fs, self.root, run_id)
            raise
        return marker

    def image_sizes(self) -> dict[str, int]:
        """The size in bytes of every file in images/, by its path relative to the output."""
        folder = self.path(IMAGES)
        if not self.fs.exists(folder):
            return {}
        return {
            f"{IMAGES}/{_basename(entry['name'])}": entry["size"]
            for entry in self.fs.ls(folder, detail=True)
        }

    def forget(self, markers: list[UnitMarker]) -> None:
        """Undo these units' commits, so that the next plan redoes them: the marker goes first."""
        for marker in markers:
            self.fs.rm(self.path(UNITS, f"{marker.unit_id}.json"))
            if marker.file and self.fs.exists(self.path(marker.file)):
                self.fs.rm(self.path(marker.file))

    def put(self, relative: str, write: Callable[[str], None]) -> None:
        """Publish the file at `relative` (e.g. metrics/configs.csv) that `write(path)` writes."""
        self._publish(write, self.path(relative))

    def _publish(self, write: Callable[[str], None], final: str) -> None:
        """Raises: StoreFailed when the store refuses the write (the temporary file is gone)."""
        with self._store():
            self.fs.makedirs(self.path(TMP), exist_ok=True)
            tmp = self.path(TMP, f"{uuid.uuid4().hex}-{_basename(final)}")
            publish(self.fs, write, final, tmp)

    @contextmanager
    def _store(self) -> Iterator[None]:
        """Turn the store's errors in the block into StoreFailed, which stops the job."""
        # s3fs passes the S3 client's connection errors through untranslated.
        botocore = sys.modules.get("botocore.exceptions")
        errors = (OSError, botocore.BotoCoreError) if botocore else (OSError,)
        try:
            yield
        except errors as e:
            raise StoreFailed(
                f"the output store refused a write to {self.location} ({first_line(e)}); "
                "free space or fix its quota, permissions or connection, then rerun to resume"
            ) from e


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]
