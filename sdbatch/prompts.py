"""Prompt sets: Parquet in, one clean table out (prompt_id, prompt, negative_prompt).

`sdbatch prompts` turns .txt/.csv/.tsv/.jsonl lists into that Parquet format with stable ids.
A prompt id is derived from the row's position and text, so rerunning a conversion gives the same
ids, and an edited prompt gets a new one.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import PurePosixPath

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from sdbatch.errors import InputError, first_line
from sdbatch.publish import publish_beside
from sdbatch.sources import COLUMNS
from sdbatch.spec import PromptSource

log = logging.getLogger("sdbatch")
PROMPT_COLUMNS = ["prompt_id", "prompt", "negative_prompt"]
TEXT_FORMATS = (".txt", ".csv", ".tsv", ".jsonl")
# Column names `sdbatch prompts` recognises as the text, in order of preference (case-insensitive).
TEXT_COLUMN_GUESSES = ("prompt", "text", "caption")


def derive_prompt_ids(texts: list[str]) -> list[str]:
    """Stable ids from row position and text: ``000042-1f3a9c2e``."""
    # A fixed width keeps ids unchanged when a list grows past a power of ten.
    return [f"{i:06d}-{hashlib.sha1(t.encode()).hexdigest()[:8]}" for i, t in enumerate(texts)]


@dataclass(frozen=True)
class PromptSet:
    """A checked prompt set, and how many null or blank rows `prompts.blank: skip` dropped."""

    frame: pd.DataFrame  # columns prompt_id, prompt, negative_prompt
    skipped_blank: int = 0
    # prompt_id and, as sources.COLUMNS names them, the image-conditioned tasks' columns the
    # spec sets (as read: structs, bytes or paths); None where it sets none
    sources: pd.DataFrame | None = None


def load_prompts(source: PromptSource) -> PromptSet:
    """Read the prompt set a spec names, checked, as columns prompt_id, prompt, negative_prompt.

    Null or blank prompts are refused, or dropped with a warning under ``blank: skip``; derived
    ids keep the row's position in the file either way.

    Raises:
        InputError: the file or a column is missing, a prompt is blank (unless skipped), an id
            repeats, or the set is empty.
    """
    fs, path = fsspec.core.url_to_fs(source.path)
    if not fs.exists(path):
        raise InputError(f"prompts.path: {source.path} does not exist")
    try:
        dataset = pads.dataset(path, filesystem=fs, format="parquet")
        names = dataset.schema.names
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(
            f"prompts.path: {source.path} is not a readable Parquet file or folder "
            f"({first_line(e)}); convert text lists with `sdbatch prompts`"
        ) from None
    wanted = {"column": source.column, "id_column": source.id_column}
    wanted["negative_column"] = source.negative_column
    wanted |= {field: getattr(source, field) for field in COLUMNS.values()}
    for key, column in wanted.items():
        if column is not None and column not in names:
            raise InputError(
                f"prompts.{key}: no column {column!r} in {source.path}; columns: {', '.join(names)}"
            )
    columns = [c for c in wanted.values() if c is not None]
    table = dataset.to_table(columns=list(dict.fromkeys(columns)))
    if source.limit is not None:
        table = table.slice(0, source.limit)

    texts = table.column(source.column).to_pylist()
    if not all(t is None or isinstance(t, str) for t in texts):
        raise InputError(f"prompts.column: column {source.column!r} must hold text")
    blank = [i for i, t in enumerate(texts) if t is None or not t.strip()]
    if blank and source.blank == "error":
        raise InputError(
            f"prompts.column: {len(blank)} prompt(s) are null or blank, first at row {blank[0]}; "
            "remove them from the prompt file, or set prompts.blank: skip"
        )
    if len(blank) == len(texts):
        skipped = f" once {len(blank)} null or blank prompt(s) are skipped" if blank else ""
        raise InputError(f"prompts.path: the prompt set in {source.path} is empty{skipped}")
    if blank:
        log.warning(
            "skipped %d null or blank prompt(s) (prompts.blank: skip), first at row %d",
            len(blank), blank[0],
        )  # fmt: skip

    if source.id_column is None:
        # Derived from every row, so skipping a blank one does not renumber the rest.
        ids = derive_prompt_ids([t or "" for t in texts])
    else:
        ids = [None if v is None else str(v) for v in table.column(source.id_column).to_pylist()]
    negatives = (
        table.column(source.negative_column).to_pylist()
        if source.negative_column
        else [None] * len(texts)
    )
    keep = sorted(set(range(len(texts))) - set(blank))
    given = {name: field for name, field in COLUMNS.items() if getattr(source, field)}
    extra = {name: table.column(getattr(source, f)).to_pylist() for name, f in given.items()}
    ids, texts, negatives = ([values[i] for i in keep] for values in (ids, texts, negatives))
    if None in ids:
        raise InputError(f"prompts.id_column: row {keep[ids.index(None)]} has a null id")
    series = pd.Series(ids)
    duplicated = series[series.duplicated()]
    if len(duplicated):
        raise InputError(
            f"prompts.id_column: {len(duplicated)} duplicate prompt id(s), "
            f"first {duplicated.iloc[0]!r}; ids must be unique"
        )
    # object dtype keeps a missing negative prompt as None; pandas' string dtype would make it NaN.
    frame = pd.DataFrame(
        {"prompt_id": ids, "prompt": texts, "negative_prompt": pd.Series(negatives, dtype=object)}
    )
    sources = None
    if extra:
        columns = {n: pd.Series([v[i] for i in keep], dtype=object) for n, v in extra.items()}
        sources = pd.DataFrame({"prompt_id": ids} | columns)
    return PromptSet(frame, len(blank), sources)


def prompt_set_digest(prompts: pd.DataFrame) -> str:
    """sha256 of the ids and texts, so a run records exactly which prompts it used."""
    h = hashlib.sha256()
    for row in prompts[PROMPT_COLUMNS].itertuples(index=False):
        h.update(json.dumps(list(row)).encode())
    return h.hexdigest()


def convert_prompt_file(
    source: str, destination: str, column: str | None = None, id_column: str | None = None
) -> int:
    """Convert a .txt/.csv/.tsv/.jsonl prompt list to Parquet with columns id, prompt, and the rest.

    .txt is one prompt per line; .csv and .tsv need a header row; .jsonl is one JSON object per
    line. Rows whose prompt is blank are skipped, with a warning that counts them (ids are derived
    after skipping). The text column is `column`, or guessed from
    `TEXT_COLUMN_GUESSES`; other columns are kept. Ids come from `id_column` if given, else from
    `derive_prompt_ids`. Returns the number of prompts written.

    Raises:
        InputError: unknown format, undecodable text, no such column, no prompts, or a
            destination that cannot be written.
    """
    suffix = PurePosixPath(source).suffix.lower()
    if suffix not in TEXT_FORMATS:
        raise InputError(f"input: {source} must end in one of {', '.join(TEXT_FORMATS)}")
    try:
        with fsspec.open(source, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise InputError(f"input: {source} does not exist") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(f"input: {source} is not UTF-8 text (line {line})") from None

    frame = _read_text_table(text, suffix, source)
    column = _text_column(frame, column, source)
    frame = frame.rename(columns={column: "prompt"})
    frame["prompt"] = frame["prompt"].astype("string").str.strip()
    kept = frame["prompt"].notna() & (frame["prompt"] != "")
    if not kept.all():
        log.warning("skipped %d row(s) of %s with a blank prompt", (~kept).sum(), source)
    frame = frame[kept].reset_index(drop=True)
    if frame.empty:
        raise InputError(f"input: {source} holds no prompts")
    if id_column is not None:
        if id_column not in frame.columns:
            raise InputError(f"--id-column: no column {id_column!r} in {source}")
        frame = frame.rename(columns={id_column: "id"})
        frame["id"] = frame["id"].astype("string")
    elif "id" in frame.columns:
        raise InputError(f"input: {source} already has an 'id' column; pass --id-column id")
    else:
        frame.insert(0, "id", derive_prompt_ids(frame["prompt"].tolist()))
    duplicated = frame.loc[frame["id"].duplicated(), "id"]
    if len(duplicated):
        raise InputError(
            f"--id-column: {len(duplicated)} duplicate id(s) in {id_column!r}, "
            f"first {duplicated.iloc[0]!r}; ids must be unique"
        )
    rest = [c for c in frame.columns if c not in ("id", "prompt")]
    table = pa.Table.from_pandas(frame[["id", "prompt", *rest]], preserve_index=False)

    try:
        publish_beside(destination, lambda fs, tmp: pq.write_table(table, tmp, filesystem=fs))
    except OSError as e:
        raise InputError(f"--output: cannot write {destination} ({first_line(e)})") from None
    return table.num_rows


def _read_text_table(text: str, suffix: str, source: str) -> pd.DataFrame:
    if suffix == ".txt":
        return pd.DataFrame({"prompt": [line for line in text.splitlines() if line.strip()]})
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise InputError(f"input: {source} line {n} is not JSON") from None
                if not isinstance(row, dict):
                    raise InputError(f"input: {source} line {n} is not a JSON object")
                rows.append(row)
        return pd.DataFrame(rows)
    # TSV files (PartiPrompts among them) hold quote characters inside prompts: no quoting there.
    quoting = csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL
    sep = "\t" if suffix == ".tsv" else ","
    try:
        return pd.read_csv(
            io.StringIO(text), sep=sep, quoting=quoting, dtype=str, keep_default_na=False
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise InputError(f"input: {source} is not a readable table ({first_line(e)})") from None


def _text_column(frame: pd.DataFrame, column: str | None, source: str) -> str:
    names = [str(c) for c in frame.columns]
    if column is not None:
        if column not in names:
            raise InputError(f"--column: no column {column!r} in {source}; columns: {names}")
        return column
    lower = {n.lower(): n for n in names}
    for guess in TEXT_COLUMN_GUESSES:
        if guess in lower:
            return lower[guess]
    if len(names) == 1:
        return names[0]
    raise InputError(f"--column: say which column holds the prompts in {source}; columns: {names}")
