"""Evaluation shards that are not their unit's (truncated, empty, random bytes, missing an array,
another unit's valid file under the name), generated or reference, and reference caches that are
not their reference's, are named in one warning line, deleted and extracted again, on a real Ray:
the numbers are those of an evaluation that never saw them. Feature bytes changed inside a shard
fail by name where they are read, and the shard is deleted for the rerun."""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import suite_data

from sdbatch.errors import JobFailed
from sdbatch.evaluation.inputs import resolve_suite
from sdbatch.evaluation.reference import ReferenceSource
from sdbatch.evaluation.run import compute_reference, evaluate
from sdbatch.evaluation.shards import (
    UNIT_ID,
    FeatureUnit,
    pending_units,
    read_npz,
    read_shard,
    write_npz,
)
from sdbatch.evaluation.suite import parse_suite
from sdbatch.evaluation.table import TIMING_COLUMNS
from sdbatch.evaluation.worker import ExtractionSetup, FeatureWorker
from sdbatch.toy.world import write_reference


def truncate(shard: Path, other: Path) -> None:
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def empty(shard: Path, other: Path) -> None:
    shard.write_bytes(b"")


def random_bytes(shard: Path, other: Path) -> None:
    shard.write_bytes(np.random.default_rng(0).bytes(shard.stat().st_size))


def drop_features(shard: Path, other: Path) -> None:
    arrays = read_npz(str(shard))
    del arrays["features"]
    np.savez(shard, **arrays)


def another_units(shard: Path, other: Path) -> None:
    shutil.copyfile(other, shard)


def another_units_without_its_id(shard: Path, other: Path) -> None:
    """Another unit's shard as sdbatch 0.1.0 wrote it, before shards named their unit."""
    arrays = read_npz(str(other))
    del arrays[UNIT_ID]
    np.savez(shard, **arrays)


# What the one warning line must say, besides the file's name.
DAMAGES = {
    truncate: "cannot be read (BadZipFile",
    empty: "cannot be read (EOFError",
    random_bytes: "cannot be read (",
    drop_features: "lacks the arrays features",
    another_units: "holds unit ",
    another_units_without_its_id: "holds other images than the unit's (",
}


def comparable(configs: pd.DataFrame) -> pd.DataFrame:
    return configs.drop(columns=list(TIMING_COLUMNS)).set_index("config_id").sort_index()


def fault_warnings(caplog) -> list[str]:
    """What was said about shards and caches (FID warns about small samples here too)."""
    records = caplog.records
    return [
        r.getMessage()
        for r in records
        if r.levelno >= logging.WARNING and r.module in ("shards", "reference")
    ]


def test_shards_that_are_not_their_units_are_named_and_extracted_again(
    evaluated_output, tmp_path, ray_address, caplog
):
    out = tmp_path / "out"
    shutil.copytree(evaluated_output["out"], out)
    shards = sorted((out / "metrics" / "_shards").rglob("*.npz"))
    mtimes = {p: p.stat().st_mtime_ns for p in shards}
    configs = {p: read_npz(str(p))["config_id"] for p in shards}
    # one shard per damage, each from a unit's shards taken in turn; an "other" shard is an
    # undamaged one of as many images from another configuration
    damaged = dict(zip(DAMAGES, shards[:: len(shards) // len(DAMAGES)], strict=False))
    assert len(damaged) == len(DAMAGES)
    for damage, bad in damaged.items():
        other = next(
            p for p in shards if p not in damaged.values()
            and len(configs[p]) == len(configs[bad]) and configs[p][0] != configs[bad][0]
        )  # fmt: skip
        damage(bad, other)
    caplog.set_level(logging.INFO, logger="sdbatch")

    summary = evaluate(str(out), evaluated_output["suite"], address=ray_address)

    lines = fault_warnings(caplog)
    assert len(lines) == len(DAMAGES), lines
    for damage, bad in damaged.items():
        (line,) = [line for line in lines if str(bad) in line]
        assert DAMAGES[damage] in line, line
        assert read_npz(str(bad))[UNIT_ID] == bad.stem
    assert f"; {len(DAMAGES)} units to extract" in caplog.text
    kept = [p for p in shards if p not in damaged.values()]
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in kept)
    expected = comparable(evaluated_output["summary"].configs)
    pd.testing.assert_frame_equal(comparable(summary.configs), expected, rtol=1e-6)

    # the shards extracted again are trusted by the next run
    caplog.clear()
    again = evaluate(str(out), evaluated_output["suite"], address=ray_address)
    assert not fault_warnings(caplog) and "; 0 units to extract" in caplog.text
    pd.testing.assert_frame_equal(comparable(again.configs), expected, rtol=1e-6)


def test_changed_feature_bytes_are_found_where_they_are_read_and_the_shard_deleted(tmp_path):
    """Planning reads a shard's keys and its arrays' headers, not the features (the bulk of it):
    a change inside them fails its checksum when they are read, naming the shard, which is
    deleted so that the rerun extracts it again."""
    keys = {
        "prompt_id": ["000000-0a"] * 64,
        "sample_index": list(range(64)),
        "config_id": ["c"] * 64,
    }
    pq.write_table(pa.table(keys), tmp_path / "u.parquet")
    unit = FeatureUnit("u", (str(tmp_path / "u.parquet"),), str(tmp_path / "u.npz"), 64)
    features = np.random.default_rng(0).normal(size=(64, 512)).astype(np.float32)
    write_npz(unit.destination, {"features": features, **keys, UNIT_ID: np.asarray("u")})
    raw = bytearray(Path(unit.destination).read_bytes())
    with zipfile.ZipFile(unit.destination) as npz:
        member = npz.getinfo("features.npy")
    raw[raw.index(b"\x93NUMPY", member.header_offset) + member.file_size - 1] ^= 0xFF
    Path(unit.destination).write_bytes(raw)

    assert pending_units([unit], ("features",)) == []
    with pytest.raises(JobFailed, match=f"^shard {re.escape(unit.destination)} is damaged .*CRC"):
        read_shard(unit.destination)
    assert pending_units([unit], ("features",)) == [unit]


def test_a_reference_shard_of_another_unit_is_extracted_again(
    evaluated_output, tmp_path, ray_address, caplog
):
    # 1. a reference of three files: three units, extracted here by the plain worker, as an
    #    evaluation that stopped before it merged them would have left them
    reference = tmp_path / "reference"
    reference.mkdir()
    for seed in range(3):
        write_reference(str(reference / f"part{seed}.parquet"), count=12, size=32, seed=seed)
    data = suite_data(reference, tmp_path / "cache")
    inputs = resolve_suite(parse_suite(data))
    units = inputs.reference.units
    # the suite's features are CLIP's
    worker = FeatureWorker(ExtractionSetup(inputs.clip, inputs.extractor, 8, threads=1))
    for unit in units:
        list(worker.run(unit))
    bad = Path(units[1].destination)
    shutil.copyfile(units[0].destination, bad)

    # 2. an output whose generated shards exist: only the damaged reference unit is left
    outputs = {}
    for name in ("damaged", "clean"):
        outputs[name] = tmp_path / name
        shutil.copytree(evaluated_output["out"], outputs[name])
    caplog.set_level(logging.INFO, logger="sdbatch")
    damaged = evaluate(str(outputs["damaged"]), parse_suite(data), address=ray_address)

    (line,) = fault_warnings(caplog)
    assert str(bad) in line and f"holds unit {units[0].unit_id}" in line, line
    assert "; 1 units to extract" in caplog.text

    # 3. the same numbers as a reference computed in one go
    clean_suite = parse_suite({**data, "cache": str(tmp_path / "clean-cache")})
    clean = evaluate(str(outputs["clean"]), clean_suite, address=ray_address)
    pd.testing.assert_frame_equal(comparable(damaged.configs), comparable(clean.configs), rtol=1e-6)


@pytest.mark.parametrize("damage", ["truncated", "another reference's"])
def test_a_reference_cache_that_is_not_its_references_is_computed_again(
    damage, evaluated_output, tmp_path, ray_address, caplog
):
    cache = tmp_path / "cache"
    shutil.copytree(evaluated_output["root"] / "cache", cache)
    (cached,) = cache.glob("*.npz")
    if damage == "truncated":
        truncate(cached, cached)
    else:
        other = tmp_path / "other.parquet"
        write_reference(str(other), count=12, size=32, seed=1)
        elsewhere = dataclasses.replace(
            evaluated_output["suite"],
            reference=ReferenceSource(images=str(other)),
            cache=str(tmp_path / "other-cache"),
        )
        shutil.copyfile(compute_reference(elsewhere, address=ray_address), cached)
    out = tmp_path / "out"
    shutil.copytree(evaluated_output["out"], out)
    suite = dataclasses.replace(evaluated_output["suite"], cache=str(cache))
    caplog.set_level(logging.INFO, logger="sdbatch")

    summary = evaluate(str(out), suite, address=ray_address)

    (line,) = fault_warnings(caplog)
    expected = {"truncated": "cannot read", "another reference's": "another dataset_sha256"}
    assert str(cached) in line and expected[damage] in line, line
    assert "; 1 units to extract" in caplog.text  # the reference's one row group
    configs = comparable(evaluated_output["summary"].configs)
    pd.testing.assert_frame_equal(comparable(summary.configs), configs, rtol=1e-6)
    caplog.clear()
    evaluate(str(out), suite, address=ray_address)
    assert not fault_warnings(caplog) and "; 0 units to extract" in caplog.text
