"""KID's kernel math on arrays (Binkowski et al. 2018, "Demystifying MMD GANs"): the unbiased MMD^2
with the polynomial kernel over random subsets, as torchmetrics' KernelInceptionDistance computes
it, with the reference's part (`KidReference`) computed once and reused for every configuration.
Pure functions, no models and no I/O, like `metric_math`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Rows of a kernel block held at once (a block is that many rows by the other set's size, in
# float64): memory stays bounded at any reference size.
KERNEL_BLOCK = 1024


def poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel between the rows of x and y: k(a, b) = (a.b / d + 1)^3 (torchmetrics'
    `poly_kernel` with its defaults)."""
    k = x @ y.T
    k /= x.shape[1]
    k += 1
    k *= k * k  # np.power has no fast path for cubes
    return k


def kid_subsets(count: int, subsets: int, size: int, seed: int, reference: bool) -> np.ndarray:
    """KID's subsets of a set of `count` vectors: (subsets, size), each row distinct indices.

    The reference's and a generated set's are drawn from separate streams of `seed`, so that the
    reference's are the same for every configuration, whatever its number of images.
    """
    rng = np.random.default_rng([seed, 0 if reference else 1])
    return np.stack([rng.choice(count, size=size, replace=False) for _ in range(subsets)])


def indicator(indices: np.ndarray, count: int) -> np.ndarray:
    """(subsets, count) booleans: row s marks the indices of subset s (distinct)."""
    marks = np.zeros((len(indices), count), dtype=bool)
    marks[np.arange(len(indices))[:, None], indices] = True
    return marks


def block_kernel_sums(
    x: np.ndarray, y: np.ndarray, rows: np.ndarray, columns: np.ndarray
) -> np.ndarray:
    """Per subset s, the sum of k(x_i, y_j) over the rows i that rows[s] marks and the columns j
    that columns[s] marks (`indicator`s): every subset's sum from one kernel."""
    marked = rows.astype(np.float64)  # so that the product runs in BLAS
    return ((marked @ poly_kernel(x, y)) * columns).sum(axis=1)


def subset_kernel_sums(
    x: np.ndarray, y: np.ndarray, rows: np.ndarray, columns: np.ndarray
) -> np.ndarray:
    """`block_kernel_sums` over all of x, KERNEL_BLOCK rows at a time."""
    sums = np.zeros(len(rows))
    for start in range(0, len(x), KERNEL_BLOCK):
        block = slice(start, start + KERNEL_BLOCK)
        sums += block_kernel_sums(x[block], y, rows[:, block], columns)
    return sums


def within_kernel_sums(x: np.ndarray, marks: np.ndarray) -> np.ndarray:
    """Per subset, the sum of k(x_i, x_j) over its pairs i != j (the off-diagonal block)."""
    self_similarity = (np.einsum("ij,ij->i", x, x) / x.shape[1] + 1) ** 3
    sums = -(marks @ self_similarity)
    for start in range(0, len(x), KERNEL_BLOCK):
        block, after = slice(start, start + KERNEL_BLOCK), slice(start + KERNEL_BLOCK, None)
        sums += block_kernel_sums(x[block], x[block], marks[:, block], marks[:, block])
        # k is symmetric: the blocks right of the diagonal count for those left of it, halving
        # the work.
        sums += 2 * block_kernel_sums(x[block], x[after], marks[:, block], marks[:, after])
    return sums


@dataclass(frozen=True)
class ReferenceSubsets:
    """One draw of reference subsets: the rows they use, which rows each marks, and each one's
    off-diagonal kernel sum."""

    features: np.ndarray  # (rows used by any subset, d) float64
    marks: np.ndarray  # (subsets, rows used): True where the subset has the row
    within: np.ndarray  # (subsets,)


class KidReference:
    """A reference's features for KID, with the reference's part of every subset's MMD^2
    computed once per draw and reused by each configuration measured against it.

    KID (Binkowski et al. 2018) is the mean and the (population) standard deviation over random
    subset pairs of the unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, as torchmetrics'
    KernelInceptionDistance computes it. For subsets R of the reference and G of the generated
    set, both of size m:

        MMD^2 = sum_{i != j in R} k / (m (m - 1)) + sum_{i != j in G} k / (m (m - 1))
                - 2 sum_{i in R, j in G} k / m^2

    The first sum depends on the reference alone. Subsets are drawn by numpy from the seed, the
    reference's and the generated set's from separate streams: the reference subsets are the same
    for every configuration, whatever its number of images.
    """

    def __init__(self, features: np.ndarray):
        self.features = features
        self._draws: dict[tuple[int, int, int], ReferenceSubsets] = {}

    def subsets(self, subsets: int, size: int, seed: int) -> ReferenceSubsets:
        """The reference's subsets for these settings, computed on first use."""
        key = (subsets, size, seed)
        if key not in self._draws:
            drawn = kid_subsets(len(self.features), subsets, size, seed, reference=True)
            used, local = np.unique(drawn.ravel(), return_inverse=True)
            x = np.asarray(self.features[used], dtype=np.float64)
            marks = indicator(local.reshape(drawn.shape), len(used))
            self._draws[key] = ReferenceSubsets(x, marks, within_kernel_sums(x, marks))
        return self._draws[key]

    def mmd2(self, features: np.ndarray, subsets: int, size: int, seed: int) -> np.ndarray:
        """(subsets,): each subset pair's unbiased MMD^2, on the subsets `kid_subsets` draws."""
        reference = self.subsets(subsets, size, seed)
        g = np.asarray(features, dtype=np.float64)
        marks = indicator(kid_subsets(len(g), subsets, size, seed, reference=False), len(g))
        cross = subset_kernel_sums(reference.features, g, reference.marks, marks)
        within = reference.within + within_kernel_sums(g, marks)
        return within / (size * (size - 1)) - 2 * cross / size**2

    def kid(
        self, features: np.ndarray, subsets: int, subset_size: int, seed: int
    ) -> tuple[float, float, int]:
        """KID mean and std of a generated set over `subsets` random subset pairs.

        `subset_size` is lowered to the smaller set's size when needed (KID is unbiased at any
        size); the size used is returned with the two numbers.
        """
        size = min(subset_size, len(features), len(self.features))
        if size < 2:
            return (float("nan"), float("nan"), size)
        mmd2 = self.mmd2(features, subsets, size, seed)
        return float(mmd2.mean()), float(mmd2.std()), size


def kid(
    features: np.ndarray,
    reference_features: np.ndarray,
    subsets: int,
    subset_size: int,
    seed: int,
) -> tuple[float, float, int]:
    """KID of a generated set against reference features, for a single measurement (see
    `KidReference`, which keeps the reference's part for the next one)."""
    return KidReference(reference_features).kid(features, subsets, subset_size, seed)
