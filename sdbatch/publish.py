"""Files that appear whole or not at all: written under a temporary name, then moved into place.

Readers (pyarrow listing a folder, a resumed run looking for shards) never see half a file, on a
local disk or on object storage, where the move is a copy of a complete object.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import fsspec


def publish(fs: Any, write: Callable[[str], None], final: str, tmp: str) -> None:
    """Write through the temporary name `tmp`, then move it to `final`: readers never see half."""
    # Made first: `tmp` may sit beside `final` (a converted prompt file into a new folder).
    fs.makedirs(final.rsplit("/", 1)[0] if "/" in final else ".", exist_ok=True)
    try:
        write(tmp)
    except BaseException:
        # A failed write must not leave its partial file behind for the next reader or run.
        if fs.exists(tmp):
            fs.rm(tmp)
        raise
    fs.mv(tmp, final)


def publish_beside(destination: str, write: Callable[[Any, str], None]) -> None:
    """Publish the file `write(fs, path)` writes at `destination` (any fsspec URI) through a
    temporary beside it, whose leading dot hides it from pyarrow's folder reads and globs."""
    fs, path = fsspec.core.url_to_fs(destination)
    folder, _, name = path.rpartition("/")
    tmp = f"{folder or '.'}/.{name}.{uuid.uuid4().hex[:8]}.partial"
    publish(fs, lambda tmp: write(fs, tmp), path, tmp)
