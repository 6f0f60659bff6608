"""KID against independent computations on small inputs: the formula written out as loops over
the same subsets, torchmetrics' MMD on the same rows and its KernelInceptionDistance on whole
sets; and the reference's kernel sums computed once for every configuration, in an evaluation
too."""

from __future__ import annotations

import math
import shutil
import statistics

import numpy as np
import pandas as pd
import pytest
import torch
from torchmetrics.image.kid import KernelInceptionDistance, maximum_mean_discrepancy, poly_kernel

from sdbatch.evaluation import kid_math
from sdbatch.evaluation.kid_math import KidReference, kid_subsets
from sdbatch.evaluation.run import evaluate

DIM = 6


def features(n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """n correlated feature vectors (a random linear map of Gaussians), offset by `shift`."""
    rng = np.random.default_rng(seed)
    return shift + rng.normal(size=(n, DIM)) @ rng.normal(size=(DIM, DIM)) / math.sqrt(DIM)


def kernel(a, b) -> float:
    return (sum(x * y for x, y in zip(a, b, strict=True)) / len(a) + 1) ** 3


def direct_kid(generated, reference, subsets: int, size: int, seed: int) -> tuple[float, float]:
    """Binkowski et al.'s KID written out, on the subsets sdbatch draws: per subset pair the
    unbiased MMD^2 as loops over pairs of rows; their mean and population std."""
    values = []
    reference_rows = kid_subsets(len(reference), subsets, size, seed, reference=True)
    generated_rows = kid_subsets(len(generated), subsets, size, seed, reference=False)
    for r_rows, g_rows in zip(reference_rows, generated_rows, strict=True):
        r, g = reference[r_rows].tolist(), generated[g_rows].tolist()
        pairs = [(i, j) for i in range(size) for j in range(size)]
        rr = sum(kernel(r[i], r[j]) for i, j in pairs if i != j)
        gg = sum(kernel(g[i], g[j]) for i, j in pairs if i != j)
        rg = sum(kernel(r[i], g[j]) for i, j in pairs)
        values.append((rr + gg) / (size * (size - 1)) - 2 * rg / size**2)
    return statistics.fmean(values), statistics.pstdev(values)


@pytest.mark.parametrize("block", [7, kid_math.KERNEL_BLOCK], ids=["blocks", "one-block"])
@pytest.mark.parametrize(
    ("n", "subset_size", "size"),
    [(25, 10, 10), (8, 10, 8)],  # the second lowered to the generated set's size
    ids=["subsets", "lowered"],
)
def test_kid_equals_the_formula_written_out_on_the_same_subsets(
    n, subset_size, size, block, monkeypatch
):
    # Kernels are computed a block of rows at a time: with several blocks too.
    monkeypatch.setattr(kid_math, "KERNEL_BLOCK", block)
    reference, generated = features(40, seed=1), features(n, seed=2, shift=0.4)
    mean, std, used = KidReference(reference).kid(generated, 4, subset_size, seed=3)
    assert used == size
    expected_mean, expected_std = direct_kid(generated, reference, 4, size, seed=3)
    assert mean == pytest.approx(expected_mean, rel=1e-10)
    assert std == pytest.approx(expected_std, rel=1e-8)
    assert std > 0


def test_each_subset_matches_torchmetrics_mmd_on_the_same_rows():
    reference, generated = features(50, seed=4), features(30, seed=5, shift=0.3)
    subsets, size, seed = 3, 12, 6
    ours = KidReference(reference).mmd2(generated, subsets, size, seed)
    reference_rows = kid_subsets(len(reference), subsets, size, seed, reference=True)
    generated_rows = kid_subsets(len(generated), subsets, size, seed, reference=False)
    for s in range(subsets):
        r = torch.as_tensor(reference[reference_rows[s]])
        g = torch.as_tensor(generated[generated_rows[s]])
        expected = maximum_mean_discrepancy(poly_kernel(r, r), poly_kernel(r, g), poly_kernel(g, g))
        assert ours[s] == pytest.approx(float(expected), rel=1e-10)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance`:UserWarning")
def test_kid_on_whole_sets_equals_torchmetrics_kernel_inception_distance():
    # Subsets as large as both sets are the whole sets, whichever way they are drawn.
    reference, generated = features(30, seed=7), features(30, seed=8, shift=0.5)
    metric = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=3, subset_size=30)
    metric.update(torch.as_tensor(reference), real=True)
    metric.update(torch.as_tensor(generated), real=False)
    expected = float(metric.compute()[0])
    mean, std, _ = KidReference(reference).kid(generated, 3, 30, seed=0)
    assert mean == pytest.approx(expected, rel=1e-10)
    assert std == pytest.approx(0, abs=1e-12 * abs(mean))


def test_subsets_are_distinct_rows_and_the_reference_s_ignore_the_generated_set():
    drawn = kid_subsets(20, 5, 7, seed=1, reference=True)
    assert drawn.shape == (5, 7) and all(len(set(row)) == 7 for row in drawn)
    assert drawn.min() >= 0 and drawn.max() < 20
    assert not np.array_equal(drawn, kid_subsets(20, 5, 7, seed=1, reference=False))
    assert not np.array_equal(drawn, kid_subsets(20, 5, 7, seed=2, reference=True))


@pytest.fixture
def reference_sums(monkeypatch) -> list[int]:
    """Records the number of rows of every off-diagonal kernel sum computed (the reference's and
    each configuration's)."""
    calls: list[int] = []
    original = kid_math.within_kernel_sums

    def spy(x, marks):
        calls.append(len(x))
        return original(x, marks)

    monkeypatch.setattr(kid_math, "within_kernel_sums", spy)
    return calls


def test_the_reference_part_is_computed_once_for_every_configuration(reference_sums):
    reference = features(200, seed=9)
    configs = [features(n, seed=n, shift=n / 100) for n in (30, 40, 50)]
    kernels = KidReference(reference)
    got = [kernels.kid(g, 5, 20, seed=1) for g in configs]
    # One reference computation, then one per configuration (its own n x n kernel).
    assert len(reference_sums) == 1 + len(configs)
    assert reference_sums[1:] == [30, 40, 50]
    # The same numbers as computing everything afresh for each configuration.
    assert got == [KidReference(reference).kid(g, 5, 20, seed=1) for g in configs]
    # Fewer images than subset_size lower the size: that is another draw of the reference.
    reference_sums.clear()
    kernels.kid(features(12, seed=10), 5, 20, seed=1)
    kernels.kid(features(12, seed=11), 5, 20, seed=1)
    assert reference_sums[1:] == [12, 12] and len(reference_sums) == 3


def test_an_evaluation_computes_the_reference_kernels_once(
    evaluated_output, tmp_path, ray_address, reference_sums
):
    out = tmp_path / "out"
    shutil.copytree(evaluated_output["out"], out)
    summary = evaluate(str(out), evaluated_output["suite"], address=ray_address)
    configs = summary.configs.set_index("config_id").sort_index()
    assert len(configs) == 4 and (configs["kid_subset_size"] == 10).all()
    assert configs[["kid_mean", "kid_std"]].notna().all().all()
    assert len(reference_sums) == 1 + len(configs)
    written = pd.read_csv(out / "metrics" / "configs.csv").set_index("config_id").sort_index()
    pd.testing.assert_frame_equal(
        written[["kid_mean", "kid_std"]], configs[["kid_mean", "kid_std"]], rtol=1e-9
    )
