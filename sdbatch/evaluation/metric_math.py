"""Metric math on arrays: pure functions, no models and no I/O.

Feature sets are summarised by `FeatureStats` (count, sum, sum of outer products, in float64),
which add up across shards and workers: FID from merged statistics equals FID from one pass.
`FrechetResamples` computes FID for many weightings of one feature set at once (bootstrap
replicates), with the same numbers as the statistics would give, at a fraction of the cost.

References:
    FID: Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local
    Nash Equilibrium". CLIP score: Hessel et al. 2021, "CLIPScore", with torchmetrics' weight
    w = 100. KID's kernel math is in `kid_math`.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from statistics import NormalDist

import numpy as np


@dataclass
class FeatureStats:
    """Sufficient statistics of a set of feature vectors; `a + b` is the statistics of both sets."""

    count: int
    total: np.ndarray  # (d,) float64: the sum of the vectors
    outer: np.ndarray  # (d, d) float64: the sum of their outer products

    @classmethod
    def of(cls, features: np.ndarray, weights: np.ndarray | None = None) -> FeatureStats:
        """The statistics of the vectors, each counted `weights[i]` times (whole numbers; once
        each without weights), as if the repeats were in the set."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be (n, d), got shape {x.shape}")
        if weights is None:
            return cls(len(x), x.sum(axis=0), x.T @ x)
        w = np.asarray(weights, dtype=np.float64)
        drawn = w > 0
        x, w = x[drawn], w[drawn]
        return cls(round(float(w.sum())), w @ x, (x * w[:, None]).T @ x)

    @classmethod
    def empty(cls, dim: int) -> FeatureStats:
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    def __add__(self, other: FeatureStats) -> FeatureStats:
        if self.dim != other.dim:
            # numpy would broadcast a 1-d set into a wrong sum instead of failing.
            raise ValueError(f"cannot merge {self.dim}-d and {other.dim}-d feature statistics")
        return FeatureStats(
            self.count + other.count, self.total + other.total, self.outer + other.outer
        )

    @property
    def dim(self) -> int:
        return len(self.total)

    def mean(self) -> np.ndarray:
        return self.total / self.count

    def covariance(self) -> np.ndarray:
        """The unbiased sample covariance (divides by n - 1, like numpy.cov and torchmetrics)."""
        if self.count < 2:
            raise ValueError("a covariance needs at least 2 feature vectors")
        mu = self.mean()
        return (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)


class FrechetReference:
    """A Gaussian (mu, sigma) to measure Fréchet distances to, with sigma's square root cached.

    d^2 = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr sqrt(S_1 S_2). The last trace is the sum of
    the square roots of the eigenvalues of sqrt(S_2) S_1 sqrt(S_2), a symmetric positive
    semi-definite matrix with the same eigenvalues as S_1 S_2: one symmetric eigensolve per
    distance, stable when S_1 is singular (fewer images than dimensions).
    """

    def __init__(self, mu: np.ndarray, sigma: np.ndarray):
        self.mu = np.asarray(mu, dtype=np.float64)
        self.sigma = np.asarray(sigma, dtype=np.float64)
        values, vectors = np.linalg.eigh(self.sigma)
        self._sqrt = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
        self._trace = float(np.trace(self.sigma))

    @property
    def dim(self) -> int:
        return len(self.mu)

    def distance(self, mu: np.ndarray, sigma: np.ndarray) -> float:
        product = self._sqrt @ sigma @ self._sqrt
        # Symmetrise: rounding makes the product very slightly asymmetric.
        eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)
        tr_sqrt = np.sqrt(eigenvalues.clip(min=0)).sum()
        diff = mu - self.mu
        return float(diff @ diff + np.trace(sigma) + self._trace - 2 * tr_sqrt)


# A batch of matrices eigensolved in one call stays near this size (one 2048 x 2048 matrix):
# small enough to share out among threads, large enough to need few calls.
BATCH_BYTES = 32 * 2**20


class FrechetResamples:
    """FID of one feature set against a reference for many weightings of its vectors at once
    (bootstrap replicates); each equals `fid(FeatureStats.of(features, w), reference)`.

    With P = X S_r^½ (the features projected once by the reference's square root), a weighting w
    that draws k vectors (W = sum w) has S_r^½ C_w S_r^½ = Pc^T diag(w) Pc / (W - 1), Pc = P
    centred on its weighted mean: a d x d matrix whose nonzero eigenvalues are those of the k x k
    matrix diag(w)^½ Pc Pc^T diag(w)^½ / (W - 1). Pc Pc^T is the Gram matrix G = P P^T, computed
    once, centred by algebra (G - g1^T - 1g^T + c, g = G w / W, c = w^T G w / W^2). So a replicate
    is one min(k, d)-sized eigensolve in place of a covariance, two d x d products and a d x d
    eigensolve. Matrices of similar size are zero-padded into batches (each zero eigenvalue adds
    sqrt(0) = 0) and solved by torch, a batch per core, or on the GPU when there is one.
    """

    def __init__(self, features: np.ndarray, reference: FrechetReference):
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != reference.dim:
            raise ValueError(f"features must be (n, {reference.dim}), got shape {x.shape}")
        # FID is unchanged when both sets move by one vector; centred features lose less to the
        # cancellations in the trace and in the Gram matrix's centring.
        shift = x.mean(axis=0) if len(x) else np.zeros(reference.dim)
        self._x = x - shift
        self._mu = reference.mu - shift
        self._squares = np.einsum("ij,ij->i", self._x, self._x)
        self._projected = self._x @ reference._sqrt
        self._reference_trace = reference._trace

    @cached_property
    def _gram(self) -> np.ndarray:
        return self._projected @ self._projected.T

    def distances(self, weights: np.ndarray) -> np.ndarray:
        """FID for each row of `weights` (replicates x vectors: how often each vector counts, in
        whole numbers); NaN where a row counts fewer than 2 vectors, as `fid` cannot compute."""
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 2 or w.shape[1] != len(self._x):
            raise ValueError(f"weights must be (replicates, {len(self._x)}), got shape {w.shape}")
        out = np.full(len(w), np.nan)
        valid = np.flatnonzero(np.round(w.sum(axis=1)) >= 2)
        w = w[valid]
        total = w.sum(axis=1)
        # 1. the mean's distance and the covariance's trace, every replicate at once
        mu = w @ self._x / total[:, None]
        trace = (w @ self._squares - total * np.einsum("ij,ij->i", mu, mu)) / (total - 1)
        diff = mu - self._mu
        # 2. tr sqrt(S_r^½ C_w S_r^½), eigensolves batched by size
        roots = self._trace_sqrts(w)
        out[valid] = np.einsum("ij,ij->i", diff, diff) + trace + self._reference_trace - 2 * roots
        return out

    def _trace_sqrts(self, weights: np.ndarray) -> np.ndarray:
        dim = self._projected.shape[1]
        sizes = np.minimum((weights > 0).sum(axis=1), dim)
        order = np.argsort(sizes, kind="stable")  # neighbours in size share a batch's padding
        per_batch = max(1, BATCH_BYTES // (8 * int(sizes.max(initial=1)) ** 2))
        batches = [order[start : start + per_batch] for start in range(0, len(order), per_batch)]
        # G w of every replicate in one product, before the threads (whose BLAS calls would
        # start threads of their own); the d x d path, for many images, needs none.
        gram_weights = (self._gram @ weights.T).T if sizes.min(initial=dim) < dim else weights

        def solve(batch: np.ndarray) -> np.ndarray:
            size = sizes[batch].max()
            stack = np.zeros((len(batch), size, size))
            for matrix, w, gw in zip(stack, weights[batch], gram_weights[batch], strict=True):
                self._fill(matrix, w, gw)
            return sqrt_eigenvalue_sums(stack)

        roots = np.empty(len(weights))
        with _solvers() as workers, ThreadPoolExecutor(workers) as pool:
            for batch, solved in zip(batches, pool.map(solve, batches), strict=True):
                roots[batch] = solved
        return roots

    def _fill(self, matrix: np.ndarray, w: np.ndarray, gram_w: np.ndarray) -> None:
        """Writes into the top-left corner of `matrix` the smaller matrix whose nonzero
        eigenvalues are S_r^½ C_w S_r^½'s (gram_w: G w, used when that is the k x k one)."""
        drawn = np.flatnonzero(w)
        w = w[drawn]
        total = w.sum()
        k, dim = len(drawn), self._projected.shape[1]
        if k < dim:
            block = matrix[:k, :k]
            block[...] = self._gram[np.ix_(drawn, drawn)]
            g = gram_w[drawn] / total
            block -= g[:, None]
            block -= g
            block += (w * g).sum() / total
            scale = np.sqrt(w / (total - 1))
            block *= scale[:, None]
            block *= scale
        else:
            p = self._projected[drawn]
            p = p - w @ p / total
            matrix[:dim, :dim] = (p * (w / (total - 1))[:, None]).T @ p


@contextmanager
def _solvers() -> Iterator[int]:
    """How many batches to solve at once: torch's thread count, each batch on one thread (on
    the GPU, one at a time). An eigensolve of a few hundred rows gains little from threads
    inside LAPACK, and on a busy machine they wait on descheduled siblings. torch, not numpy,
    because its thread count can be set here (numpy's BLAS fixes its own when it loads)."""
    import torch

    if torch.cuda.is_available():
        yield 1
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


def sqrt_eigenvalue_sums(stack: np.ndarray) -> np.ndarray:
    """tr sqrt(M) for each symmetric positive semi-definite M of a (batch, m, m) stack: the sum
    of the square roots of its eigenvalues, the small negative ones of rounding counted as 0."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    eigenvalues = torch.linalg.eigvalsh(torch.from_numpy(stack).to(device)).cpu().numpy()
    return np.sqrt(eigenvalues.clip(min=0)).sum(axis=1)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2): FID on Inception features."""
    return FrechetReference(mu2, sigma2).distance(mu1, sigma1)


def merge_stats(stats: list[FeatureStats]) -> FeatureStats:
    """The statistics of the union of the sets (in the given order)."""
    return sum(stats[1:], stats[0])


def fid(stats: FeatureStats, reference: FrechetReference) -> float:
    """FID of a generated feature set (given by its statistics) against a reference."""
    return reference.distance(stats.mean(), stats.covariance())


def clip_scores(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
    """Per-pair CLIP score, 100 * max(cos(image, text), 0), row by row."""
    image = np.asarray(image_embeddings, dtype=np.float64)
    text = np.asarray(text_embeddings, dtype=np.float64)
    image = image / np.linalg.norm(image, axis=1, keepdims=True)
    text = text / np.linalg.norm(text, axis=1, keepdims=True)
    return 100 * np.maximum((image * text).sum(axis=1), 0)


def bootstrap_samples(n: int, samples: int, seed: int) -> np.ndarray:
    """`samples` rows of n indices drawn with replacement (the same draws for the same seed)."""
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def cluster_counts(clusters: int, samples: int, seed: int) -> np.ndarray:
    """(samples, clusters): how often each cluster is drawn in each replicate of a bootstrap that
    resamples whole clusters with replacement (Davison & Hinkley 1997, sec. 3.8; with one member
    per cluster it is the ordinary bootstrap). The draws are `bootstrap_samples`'; none from a
    single cluster, whose replicates could not vary."""
    if clusters < 2:
        return np.zeros((0, clusters), dtype=np.int64)
    draws = bootstrap_samples(clusters, samples, seed)
    offsets = (draws + clusters * np.arange(samples)[:, None]).ravel()
    return np.bincount(offsets, minlength=samples * clusters).reshape(samples, clusters)


def weighted_mean(values: np.ndarray, weights: np.ndarray | None = None) -> float:
    """The mean of `values`, each counted `weights[i]` times; NaN values (not scored) left out."""
    values = np.asarray(values, dtype=np.float64)
    w = np.ones(len(values)) if weights is None else np.asarray(weights, dtype=np.float64)
    scored = ~np.isnan(values)
    total = w[scored].sum()
    return float(w[scored] @ values[scored] / total) if total > 0 else float("nan")


def percentile_interval(replicates: np.ndarray, confidence: float) -> tuple[float, float]:
    """The percentile bootstrap interval: the replicates' (1 -+ confidence) / 2 quantiles."""
    r = np.asarray(replicates, dtype=np.float64)
    r = r[np.isfinite(r)]
    if len(r) < 2:
        return (float("nan"), float("nan"))
    tail = (1 - confidence) / 2
    low, high = np.quantile(r, [tail, 1 - tail])
    return float(low), float(high)


def normal_interval(
    estimate: float, replicates: np.ndarray, confidence: float
) -> tuple[float, float]:
    """estimate +- z * SE, SE the replicates' standard deviation: for statistics whose replicates
    are biased (FID: repeated images shrink the covariance), so percentiles would not bracket it."""
    r = np.asarray(replicates, dtype=np.float64)
    r = r[np.isfinite(r)]
    if len(r) < 2 or not np.isfinite(estimate):
        return (float("nan"), float("nan"))
    half = NormalDist().inv_cdf(0.5 + confidence / 2) * float(np.std(r, ddof=1))
    return estimate - half, estimate + half
