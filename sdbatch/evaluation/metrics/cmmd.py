"""CMMD (Jayasumana et al. 2024, "Rethinking FID: Towards a Better Evaluation Metric for Image
Generation"): the maximum mean discrepancy between the L2-normalised CLIP image embeddings of a
configuration's images and of the reference, with a Gaussian RBF kernel of bandwidth sigma = 10,
times 1000, as the reference code computes it (google-research/cmmd, distance.py).

Estimator: the reference code's, the biased (V-statistic, minimum-variance) MMD² of Gretton et al.
2012, eq. 5: each of k_xx, k_yy and k_xy is the mean over all pairs, the diagonal included. Kept
because CMMD is defined by that code: its numbers are the ones papers report, it is never
negative, and it is exactly 0 for identical sets. Its bias above the population MMD² is
1000 (1 - mean off-diagonal k)/n for a set of n: at most 19.8/n (unit vectors are at most 2
apart), 3/n to 5/n for embeddings whose cosine similarities are 0.5 to 0.7. Compare
configurations at equal image counts, as with FID. The unbiased estimator drops the diagonal of
k_xx and k_yy and can go negative.

Cost: the configuration's n x n kernel matrix and its n x m block against the reference, once
per configuration (O(n (n + m) d)); the reference's m x m sum once per reference, in blocks of
rows. A bootstrap replicate reweights the configuration's images, which needs only the n x n
matrix and the n row sums against the reference: O(n²) each, no kernel recomputed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdbatch.evaluation.metric import QUALITY, ConfigGroup, Interval, Metric, Need, Score
from sdbatch.evaluation.reference import ReferenceStats

SIGMA = 10.0  # the reference code's bandwidth, chosen in the paper for CLIP embeddings
SCALE = 1000.0  # the reference code's scale, to make the numbers readable
BLOCK = 2048  # rows of a kernel block held at once: 2048 x m float64 per block


def normalized(embeddings: np.ndarray) -> np.ndarray:
    """The embeddings as unit vectors, in float64."""
    x = np.asarray(embeddings, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rbf_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """exp(-|x_i - y_j|² / (2 sigma²)) for every row of x and y, both unit vectors."""
    # |x - y|² = 2 - 2 x.y for unit vectors: one matrix product.
    return np.exp(-(2.0 - 2.0 * (x @ y.T)) / (2 * SIGMA**2))


def kernel_row_sums(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """For each row of x, the sum of its kernel values with every row of y; in blocks of rows."""
    return np.concatenate(
        [rbf_kernel(x[i : i + BLOCK], y).sum(axis=1) for i in range(0, len(x), BLOCK)]
    )


@dataclass(frozen=True)
class MmdKernels:
    """A generated set's kernel values against itself and a fixed reference: the MMD of any
    reweighting of the set (a bootstrap replicate) without computing a kernel again."""

    within: np.ndarray  # (n, n): k(g_i, g_j)
    across: np.ndarray  # (n,): the mean over the reference of k(g_i, r)
    reference: float  # the mean of k(r_i, r_j) over all pairs, the diagonal included

    @classmethod
    def of(
        cls, generated: np.ndarray, reference: np.ndarray, reference_mean: float | None = None
    ) -> MmdKernels:
        """From unit vectors; `reference_mean`: `reference_kernel_mean(reference)`, if known."""
        if reference_mean is None:
            reference_mean = reference_kernel_mean(reference)
        across = kernel_row_sums(generated, reference) / len(reference)
        return cls(rbf_kernel(generated, generated), across, reference_mean)

    def cmmd(self, weights: np.ndarray | None = None) -> float:
        """1000 x the biased MMD² with each generated image counted `weights[i]` times (once
        each without weights), as if the repeats were in the set; NaN for no image."""
        w = np.ones(len(self.across)) if weights is None else np.asarray(weights, np.float64)
        total = w.sum()
        if total == 0:
            return math.nan
        mmd2 = (w @ self.within @ w) / total**2 + self.reference - 2 * (w @ self.across) / total
        return float(SCALE * mmd2)


def reference_kernel_mean(reference: np.ndarray) -> float:
    """The mean of the kernel over all pairs of rows of `reference` (unit vectors)."""
    return float(kernel_row_sums(reference, reference).sum() / len(reference) ** 2)


def cmmd(generated: np.ndarray, reference: np.ndarray) -> float:
    """CMMD between two sets of CLIP image embeddings (any scale: they are normalised here)."""
    return MmdKernels.of(normalized(generated), normalized(reference)).cmmd()


def aggregate(group: ConfigGroup, settings: Any) -> dict[str, Any]:
    reference = group.reference
    if reference.clip_embeddings is None or len(group.images) == 0:
        return {"cmmd": math.nan}
    # The reference's own term is the same for every configuration.
    embedded, mean = group.per_reference("cmmd", lambda: _reference_term(reference))
    kernels = group.per_configuration(
        "cmmd", lambda: MmdKernels.of(normalized(group.clip_embeddings), embedded, mean)
    )
    return {"cmmd": kernels.cmmd(group.weights)}


def _reference_term(reference: ReferenceStats) -> tuple[np.ndarray, float]:
    embedded = normalized(reference.clip_embeddings)
    return embedded, reference_kernel_mean(embedded)


CMMD = Metric(
    name="cmmd",
    label="CMMD",
    higher_is_better=False,
    judges=QUALITY,
    needs=frozenset({Need.CLIP, Need.EMBEDDINGS, Need.REFERENCE}),
    # A replicate that repeats images counts their k(g, g) = 1 pairs again, which biases it
    # upwards, as for FID: percentiles might not bracket the estimate.
    interval=Interval.NORMAL,
    aggregate=aggregate,
    scores=(Score("cmmd", "CMMD", digits=3),),
    ranked=True,
    least=0.0,
)
