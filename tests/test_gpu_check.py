"""bench/gpu_check.sh --smoke: the prepared GPU check runs end to end on CPU, so it has not
rotted when a GPU is next lent for a few minutes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_smoke_mode_prints_every_row(tmp_path):
    # RAY_ADDRESS=local: its own Ray instance, never a cluster another test started with ray start
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "2", "RAY_ADDRESS": "local"}
    done = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--smoke"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    for shape in ("sd15", "sdxl"):
        rows = {r["pipeline"]: r for r in results["generation"][shape]}
        plain = rows["plain diffusers, batch 1"]["images/s"]
        assert any(name.startswith("plain diffusers, batch ") for name in rows if name[-1] != "1")
        for row in rows.values():
            assert row["images/s"] > 0 and row["% of limit"] > 0
            assert row["x plain"] == pytest.approx(row["images/s"] / plain, abs=0.01)
        assert "sdbatch, defaults" in rows
        assert f"| sdbatch, defaults | {rows['sdbatch, defaults']['images']} |" in done.stdout
    assert results["evaluation"]["images"] == 16
    assert results["evaluation"]["images/s (extraction)"] > 0
