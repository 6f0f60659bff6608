"""Benchmark: precision, recall, density and coverage at the scale of a real sweep, on synthetic
features (so it runs anywhere in minutes).

Times, with sdbatch's own functions: the reference's k-NN radii (once per reference), one
configuration's neighbourhoods (once per configuration), its four estimates, and its bootstrap
replicates over prompts; counts the pairs kept per configuration. Then checks the estimates and a
few replicates against a direct computation on full distance matrices.

    python bench/prdc_scale.py                                 # n 1000, reference 10,000, d 2048
    python bench/prdc_scale.py --reference 2000 --dim 256 --replicates 50
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def d2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The full matrix of squared distances, in float64."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return ((a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2 * a @ b.T).clip(min=0)


def radius(features: np.ndarray, k: int) -> np.ndarray:
    """Squared distance to the k-th nearest other row (the (k+1)-th smallest, itself first)."""
    return np.partition(d2(features, features), k, axis=1)[:, k]


def direct(real: np.ndarray, real_radius: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """The four numbers from full distance matrices (as clovaai/generative-evaluation-prdc)."""
    fake_radius = radius(fake, k)
    cross = d2(real, fake)
    inside = cross < real_radius[:, None]
    return {
        "precision": inside.any(axis=0).mean(),
        "recall": (cross < fake_radius[None, :]).any(axis=1).mean(),
        "density": inside.sum(axis=0).mean() / k,
        "coverage": (cross.min(axis=1) < real_radius).mean(),
    }


class Clock:
    """Wall and CPU seconds since it was made (CPU time is what a busy machine does not inflate)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def __str__(self) -> str:
        wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        return f"{wall:.2f} s ({cpu:.2f} s CPU)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="per configuration")
    parser.add_argument("--per-prompt", type=int, default=2)
    parser.add_argument("--reference", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--replicates", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--check", type=int, default=3, help="replicates checked directly")
    args = parser.parse_args()
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(args.threads)

    import pandas as pd  # after the thread settings: numpy's BLAS reads them when loaded

    from sdbatch.evaluation.metric import Bootstrap, ConfigGroup, aggregate_with_intervals
    from sdbatch.evaluation.metric_math import FeatureStats, cluster_counts
    from sdbatch.evaluation.metrics.prdc import PRDC, PrdcSettings, ball_radii, neighbourhoods
    from sdbatch.evaluation.reference import ReferenceStats

    # Image features lie near a low-dimensional set: a 32-d latent, projected, plus a little noise
    # (isotropic 2048-d Gaussians put every point about equally far from every other).
    rng = np.random.default_rng(0)
    projection = rng.normal(size=(32, args.dim)) / np.sqrt(32)

    def features(count: int, shift: float, scale: float) -> np.ndarray:
        latent = rng.normal(shift, scale, size=(count, 32))
        return (latent @ projection + 0.1 * rng.normal(size=(count, args.dim))).astype(np.float32)

    real, fake = features(args.reference, 0.0, 1.0), features(args.images, 0.2, 0.9)
    k = args.k
    print(f"n {args.images}, reference {args.reference}, d {args.dim}, k {k}, "
          f"{args.replicates} replicates, {args.threads} threads")  # fmt: skip

    # timed apart here; evaluation computes them in the first metric's first call
    clock = Clock()
    radii = ball_radii(real, k)
    print(f"reference radii (once per reference): {clock}")
    clock = Clock()
    hood = neighbourhoods(fake, real, radii, k)
    print(f"neighbourhoods (once per configuration): {clock}")
    pairs = len(hood.covering[0]), len(hood.reach[0])
    arrays = [*hood.covering, *hood.reach, hood.near, hood.near_d2, hood.held]
    kept = sum(a.nbytes for a in arrays)
    print(f"pairs kept: {pairs[0]} for coverage, {pairs[1]} for recall ({kept / 2**20:.1f} MiB)")

    # the metrics as evaluation runs them (radii and neighbourhoods computed again, once)
    stats = FeatureStats.of(fake)
    reference = ReferenceStats(stats.mean(), stats.covariance(), len(real), real)
    prompts = np.arange(args.images) // args.per_prompt
    group = ConfigGroup(
        config_id="c",
        images=pd.DataFrame({"prompt_id": prompts}),
        merged=stats,
        reference=reference,
        frechet=None,
        feature_dim=args.dim,
        bootstrap=Bootstrap(samples=args.replicates),
        load_features=lambda: fake,
    )
    weights = cluster_counts(prompts.max() + 1, args.replicates, seed=0)[:, prompts]
    settings, rows, replicates = PrdcSettings(k=k), {}, {}
    group.features  # noqa: B018  (loaded, as evaluation loads them before its metrics)
    for metric in PRDC:
        clock = Clock()
        row, drawn = aggregate_with_intervals(metric, group, settings, weights)
        rows.update(row)
        replicates.update(drawn)
        name = metric.name
        print(f"{name:9} {row[name]:.4f} [{row[name + '_low']:.4f}, {row[name + '_high']:.4f}]  "
              f"estimate + {args.replicates} replicates: {clock}")  # fmt: skip

    clock = Clock()
    real_radius = radius(real, k)
    expected = direct(real, real_radius, fake, k)
    print(f"direct estimate (full matrices): {clock}")
    worst = max(abs(rows[n] - v) for n, v in expected.items())
    for r in range(args.check):
        w = weights[r]
        repeated = direct(real, real_radius, np.repeat(fake, w, axis=0), k)
        distinct = direct(real, real_radius, fake[w > 0], k)
        for metric in PRDC:
            name = metric.name
            want = (repeated if name in ("precision", "density") else distinct)[name]
            worst = max(worst, abs(replicates[name][r] - want))
    print(f"largest difference from the direct computation: {worst:.2e}")


if __name__ == "__main__":
    main()
