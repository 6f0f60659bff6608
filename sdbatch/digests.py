"""sha256 identities of what numbers depend on: a file, a model folder, a module's weights.

Each is written as ``sha256:HEX`` into run.json, metrics.json and cache names, so that a number is
stored with exactly what made it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

# What makes up a model folder: weights, configs and tokenizer files. Other files (READMEs,
# images, duplicate .bin/.ckpt copies) do not change a result and would only slow the hash down.
IDENTITY_SUFFIXES = (".safetensors", ".json", ".txt", ".model")


def file_digest(path: Path) -> str:
    """sha256 of one file's bytes (a weights file)."""
    return f"sha256:{_hash_file(hashlib.sha256(), path).hexdigest()}"


def folder_digest(folder: Path, suffixes: tuple[str, ...] = IDENTITY_SUFFIXES) -> str:
    """sha256 over a model folder's files with these suffixes (their names and bytes)."""
    h = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in suffixes)
    for path in files:
        h.update(path.relative_to(folder).as_posix().encode() + b"\x00")
        _hash_file(h, path)
    return f"sha256:{h.hexdigest()}"


def state_dict_digest(module: Any) -> str:
    """sha256 over a torch module's named tensors: the same for the same weights anywhere."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode() + b"\x00" + tensor.detach().cpu().contiguous().numpy().tobytes())
    return f"sha256:{h.hexdigest()}"


def _hash_file(h: Any, path: Path) -> Any:
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h
