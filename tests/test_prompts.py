"""Prompt sets: loading with checks, stable ids, and `sdbatch prompts` conversions."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import PROMPTS, REPO, job

from sdbatch.cli import main
from sdbatch.errors import InputError
from sdbatch.prompts import convert_prompt_file, derive_prompt_ids, load_prompts
from sdbatch.spec import PromptSource


def test_derived_ids_are_stable_and_follow_position_and_text():
    ids = derive_prompt_ids(["a cat", "a dog", "a cat"])
    assert ids == derive_prompt_ids(["a cat", "a dog", "a cat"])
    assert len(set(ids)) == 3  # the same text twice still gets two ids
    assert ids[:2] == derive_prompt_ids(["a cat", "a dog", "something new"])[:2]
    assert derive_prompt_ids(["a cow"])[0] != ids[0]


def test_load_with_id_negative_column_and_limit(prompt_file):
    path = prompt_file(id=[10, 11, 12, 13, 14, 15], neg=["blurry", None, "", "x", "y", "z"])
    source = PromptSource(str(path), id_column="id", negative_column="neg", limit=3)
    prompts = load_prompts(source).frame
    assert list(prompts.columns) == ["prompt_id", "prompt", "negative_prompt"]
    assert prompts["prompt_id"].tolist() == ["10", "11", "12"]
    assert prompts["negative_prompt"].tolist() == ["blurry", None, ""]
    assert prompts["prompt"].tolist() == PROMPTS[:3]


def test_load_reads_a_folder_of_parquet_files(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(pa.table({"prompt": ["a", "b"]}), folder / "part-0.parquet")
    pq.write_table(pa.table({"prompt": ["c"]}), folder / "part-1.parquet")
    assert load_prompts(PromptSource(str(folder))).frame["prompt"].tolist() == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("columns", "source", "message"),
    [
        ({}, {"column": "text"}, "prompts.column: no column 'text'"),
        ({}, {"id_column": "uid"}, "prompts.id_column: no column 'uid'"),
        ({}, {"negative_column": "neg"}, "prompts.negative_column: no column 'neg'"),
        ({"id": [1, 1, 2, 3, 4, 5]}, {"id_column": "id"}, "duplicate prompt id"),
    ],
)
def test_load_errors(prompt_file, columns, source, message):
    path = prompt_file(**columns)
    with pytest.raises(InputError, match=message):
        load_prompts(PromptSource(str(path), **source))


def test_blank_and_empty_prompt_sets(prompt_file):
    with pytest.raises(InputError, match=r"2 prompt.* null or blank, first at row 1;.*blank: skip"):
        load_prompts(PromptSource(str(prompt_file(["ok", "  ", None]))))
    with pytest.raises(InputError, match=r"prompts\.path: the prompt set .* is empty$"):
        load_prompts(PromptSource(str(prompt_file([]))))
    with pytest.raises(InputError, match=r"is empty once 2 null or blank prompt\(s\) are skipped"):
        load_prompts(PromptSource(str(prompt_file(["", None])), blank="skip"))


def test_skipping_blank_prompts_keeps_the_other_ids(prompt_file, caplog):
    texts = ["a cat", None, "a dog", " \t", "a cow"]
    path = prompt_file(texts, neg=["n0", "n1", "n2", "n3", "n4"], uid=["a", None, "c", "d", "e"])
    loaded = load_prompts(PromptSource(str(path), negative_column="neg", blank="skip"))
    assert loaded.skipped_blank == 2
    assert "skipped 2 null or blank prompt(s) (prompts.blank: skip), first at row 1" in caplog.text
    whole = derive_prompt_ids(["a cat", "", "a dog", "", "a cow"])
    assert loaded.frame["prompt_id"].tolist() == [whole[0], whole[2], whole[4]]
    assert loaded.frame["prompt"].tolist() == ["a cat", "a dog", "a cow"]
    assert loaded.frame["negative_prompt"].tolist() == ["n0", "n2", "n4"]
    # A skipped row's null id does not matter; ids are checked on the rows that are kept.
    kept = load_prompts(PromptSource(str(path), id_column="uid", blank="skip")).frame
    assert kept["prompt_id"].tolist() == ["a", "c", "e"]
    assert load_prompts(PromptSource(str(prompt_file(["a", "b"])))).skipped_blank == 0


def test_not_parquet_and_missing(tmp_path):
    bogus = tmp_path / "prompts.parquet"
    bogus.write_text("this is not parquet\n")
    with pytest.raises(InputError, match=r"prompts\.path: .* not a readable Parquet"):
        load_prompts(PromptSource(str(bogus)))
    with pytest.raises(InputError, match=r"prompts\.path: .* does not exist"):
        load_prompts(PromptSource(str(tmp_path / "nope.parquet")))


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"prompts": {"path": "missing.parquet"}}, "prompts.path"),
        ({"prompts": {"path": "notes.parquet"}}, "prompts.path"),  # text, not Parquet
        ({"prompts": {"column": "caption"}}, "prompts.column"),
        ({"prompts": {"id_column": "uid"}}, "prompts.id_column"),
        ({"prompts": {"negative_column": "negative"}}, "prompts.negative_column"),
    ],
)
def test_prompt_errors_exit_2_before_anything_is_written(
    override, field, tmp_path, prompt_file, spec_file, capsys
):
    (tmp_path / "notes.parquet").write_text("a cat\na dog\n")
    path = spec_file(job(prompt_file(), **override))
    assert main(["generate", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sdbatch: error: {field}:") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("texts", "source", "message"),
    [
        ([], {}, "prompts.path: the prompt set"),
        (["a cat", " "], {}, "prompts.column: 1 prompt(s) are null or blank, first at row 1"),
        (["", None], {"blank": "skip"}, "is empty once 2 null or blank prompt(s) are skipped"),
    ],
)
def test_empty_or_blank_prompt_sets_exit_2(
    tmp_path, prompt_file, spec_file, capsys, texts, source, message
):
    path = spec_file(job(prompt_file(texts), prompts=source))
    assert main(["generate", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_convert_txt_csv_jsonl_agree(tmp_path):
    texts = ["a red circle", 'a "quoted" word, with a comma', "naïve café ☕"]
    (tmp_path / "p.txt").write_text("\n".join([texts[0], "", texts[1], texts[2]]) + "\n")
    pd.DataFrame({"prompt": texts, "style": ["x", "y", "z"]}).to_csv(
        tmp_path / "p.csv", index=False
    )
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tables = {}
    for suffix in ("txt", "csv", "jsonl"):
        n = convert_prompt_file(str(tmp_path / f"p.{suffix}"), str(tmp_path / f"{suffix}.parquet"))
        assert n == 3
        tables[suffix] = pd.read_parquet(tmp_path / f"{suffix}.parquet")
    for table in tables.values():
        assert table["prompt"].tolist() == texts
        assert table["id"].tolist() == derive_prompt_ids(texts)
    assert tables["csv"]["style"].tolist() == ["x", "y", "z"]


def test_convert_partiprompts_tsv_and_load_it(tmp_path, parti):
    """The real PartiPrompts file: quotes, unicode and long prompts, 1,632 rows."""
    out = tmp_path / "parti.parquet"
    assert main(["prompts", str(parti), "-o", str(out)]) == 0
    table = pd.read_parquet(out)
    assert len(table) == 1632
    assert list(table.columns) == ["id", "prompt", "Category", "Challenge", "Note"]
    assert table["id"].is_unique
    raw = parti.read_text(encoding="utf-8").splitlines()[1:]
    assert table["prompt"].tolist() == [line.split("\t")[0].strip() for line in raw]
    prompts = load_prompts(PromptSource(str(out), id_column="id")).frame
    assert prompts["prompt_id"].tolist() == table["id"].tolist()


def test_partiprompts_with_a_byte_that_is_not_utf8(tmp_path, parti, capsys):
    lines = parti.read_bytes().split(b"\n")
    lines[1000] = lines[1000].replace(b" ", b" \xe9 ", 1)  # a Latin-1 "é" in a UTF-8 file
    broken = tmp_path / "PartiPrompts.tsv"
    broken.write_bytes(b"\n".join(lines))
    assert main(["prompts", str(broken), "-o", str(tmp_path / "parti.parquet")]) == 2
    expected = f"sdbatch: error: input: {broken} is not UTF-8 text (line 1001)\n"
    assert capsys.readouterr().err == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["PartiPrompts.tsv"]


def test_partiprompts_with_repeated_ids(tmp_path, parti, spec_file, capsys):
    """Category is no id column: refused when converting, and when a spec names it."""
    target = tmp_path / "parti.parquet"
    assert main(["prompts", str(parti), "-o", str(target), "--id-column", "Category"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdbatch: error: --id-column: 1620 duplicate id(s) in 'Category', first ")
    assert not target.exists()
    assert main(["prompts", str(parti), "-o", str(target)]) == 0
    path = spec_file(job(target, prompts={"id_column": "Category"}))
    assert main(["generate", str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    assert "prompts.id_column: 1620 duplicate prompt id(s)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_partiprompts_with_a_blank_prompt(tmp_path, parti, spec_file, capsys, caplog):
    """Refused by default; `prompts.blank: skip` drops it and keeps every other prompt's id."""
    assert main(["prompts", str(parti), "-o", str(tmp_path / "parti.parquet")]) == 0
    table = pd.read_parquet(tmp_path / "parti.parquet")
    table.loc[700, "prompt"] = "   "
    table.drop(columns="id").to_parquet(tmp_path / "blank.parquet")
    out = tmp_path / "out"
    path = spec_file(job(tmp_path / "blank.parquet"))
    assert main(["generate", str(path), "--out", str(out), "--dry-run"]) == 2
    assert capsys.readouterr().err == (
        "sdbatch: error: prompts.column: 1 prompt(s) are null or blank, first at row 700; "
        "remove them from the prompt file, or set prompts.blank: skip\n"
    )
    skip = job(tmp_path / "blank.parquet", prompts={"blank": "skip"}, sweep={"scheduler": "ddim"})
    assert main(["generate", str(spec_file(skip)), "--out", str(out), "--dry-run"]) == 0
    skipped = "skipped 1 null or blank prompt(s) (prompts.blank: skip), first at row 700"
    assert skipped in caplog.text and "1631 prompts x 2 configurations" in caplog.text
    loaded = load_prompts(PromptSource(str(tmp_path / "blank.parquet"), blank="skip")).frame
    assert loaded["prompt_id"].tolist() == table["id"].drop(index=700).tolist()
    assert not out.exists()


@pytest.mark.parametrize(
    ("name", "content", "args", "message"),
    [
        ("p.md", b"a cat\n", [], "must end in one of"),
        ("p.txt", b"a cat\n\xff\xfe broken\n", [], "not UTF-8 text (line 2)"),
        ("p.jsonl", b'{"prompt": "a"}\nnot json\n', [], "line 2 is not JSON"),
        ("p.csv", b"a,b\n1,2\n", [], "--column: say which column"),
        ("p.csv", b"prompt\n1\n", ["--column", "text"], "--column: no column 'text'"),
        ("p.txt", b"\n\n", [], "holds no prompts"),
    ],
)
def test_convert_errors_exit_2_without_output(tmp_path, capsys, name, content, args, message):
    source = tmp_path / name
    source.write_bytes(content)
    target = tmp_path / "out.parquet"
    assert main(["prompts", str(source), "-o", str(target), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not target.exists()


def test_a_failed_conversion_leaves_nothing_a_reader_would_see(tmp_path, monkeypatch):
    folder = tmp_path / "prompts"
    folder.mkdir()
    pq.write_table(pa.table({"id": ["x"], "prompt": ["kept"]}), folder / "part-0.parquet")
    (tmp_path / "more.txt").write_text("a cat\na dog\n")

    def dies_halfway(table, where, filesystem):
        with filesystem.open(where, "wb") as f:
            f.write(b"PAR1 half a file")
        raise OSError("No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(pq, "write_table", dies_halfway)
        with pytest.raises(InputError, match=r"--output: cannot write .*No space left"):
            convert_prompt_file(str(tmp_path / "more.txt"), str(folder / "part-1.parquet"))
    assert sorted(p.name for p in folder.iterdir()) == ["part-0.parquet"]
    # Had the process been killed instead, its hidden partial file is not part of the folder.
    (folder / ".part-1.parquet.partial").write_bytes(b"PAR1 half a file")
    source = PromptSource(str(folder), id_column="id")
    assert load_prompts(source).frame["prompt"].tolist() == ["kept"]
    convert_prompt_file(str(tmp_path / "more.txt"), str(tmp_path / "new" / "more.parquet"))
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["more.parquet"]


def test_shipped_demo_prompts_match_their_text_source(tmp_path):
    convert_prompt_file(str(REPO / "jobs/demo-prompts.txt"), str(tmp_path / "demo.parquet"))
    fresh = pd.read_parquet(tmp_path / "demo.parquet")
    pd.testing.assert_frame_equal(fresh, pd.read_parquet(REPO / "jobs/demo-prompts.parquet"))


def test_convert_counts_skipped_blank_rows_and_refuses_an_unwritable_output(
    tmp_path, capsys, caplog
):
    source = tmp_path / "p.csv"
    source.write_text("prompt,style\na cat,photo\n   ,photo\n,sketch\na dog,oil\n")
    assert main(["prompts", str(source), "-o", str(tmp_path / "p.parquet")]) == 0
    assert "skipped 2 row(s) of" in caplog.text
    assert pq.read_table(tmp_path / "p.parquet").column("prompt").to_pylist() == ["a cat", "a dog"]

    (tmp_path / "a-file").write_text("not a folder")
    assert main(["prompts", str(source), "-o", str(tmp_path / "a-file" / "p.parquet")]) == 2
    err = capsys.readouterr().err
    assert "--output: cannot write" in err and err.count("\n") == 1
