"""Benchmark: evaluation's metric math at the scale of a real sweep, on synthetic float64 features.

FID bootstrap: the seconds per replicate of the direct computation (weighted statistics, a d x d
covariance, two d x d products and a d x d eigensolve: what `aggregate` does on each resampled
configuration) and of `FrechetResamples` (features projected once by the reference's square root,
one min(k, d)-sized eigensolve per replicate, replicates batched), on the same resamples of the
bootstrap over prompts; their ratio, the largest relative difference between the two, and the time
both would take for a sweep's configurations (`--configs`), each with its estimate and replicates.

The reference's Gaussian is fitted and its square root taken once per run, outside the timings.
The fast side's time per configuration includes the projection and the Gram matrix, and is
measured on a few whole configurations (`--measure`); the direct side's is the median of 3 timed
replicates.

    python bench/eval_scale.py                 # d = 2048 and 1024: 1000 images, 200 replicates
    python bench/eval_scale.py --dim 2048 --threads 1
    python bench/eval_scale.py --per-prompt 4  # 250 prompts of 4 images each
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

from sdbatch.evaluation.metric_math import (
    FeatureStats,
    FrechetReference,
    FrechetResamples,
    cluster_counts,
    fid,
)

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def synthetic(rng: np.random.Generator, n: int, d: int, shift: float) -> np.ndarray:
    """n correlated d-dimensional vectors with a decaying spectrum, like a network's features."""
    mixing = rng.normal(size=(d, d)) / np.sqrt(1 + np.arange(d))[:, None]
    return rng.normal(size=(n, d)) @ mixing + shift


def fid_bootstrap(args: argparse.Namespace, d: int) -> None:
    """Prints the section's table for one feature dimension."""
    rng = np.random.default_rng(d)
    real = synthetic(rng, args.reference, d, shift=0.3)
    frechet = FrechetReference(real.mean(axis=0), np.cov(real, rowvar=False))
    prompts = args.images // args.per_prompt
    counts = cluster_counts(prompts, args.replicates, args.seed)
    weights = np.repeat(counts, args.per_prompt, axis=1)  # every image of a prompt: its count
    drawn = (weights > 0).sum(axis=1)

    # 1. all at once, on whole configurations: projection and estimate, then the replicates
    setup, fast = [], []
    for c in range(args.measure):
        x = synthetic(rng, len(weights[0]), d, shift=0.3 + 0.01 * c)
        began = time.perf_counter()
        resamples = FrechetResamples(x, frechet)
        resamples.distances(np.ones((1, len(x))))
        setup.append(time.perf_counter() - began)
        began = time.perf_counter()
        replicates = resamples.distances(weights)
        fast.append(time.perf_counter() - began)
    fast_setup, fast_replicate = statistics.median(setup), statistics.median(fast) / len(weights)

    # 2. direct, one replicate at a time, on the last configuration
    timed, difference = [], 0.0
    for w, expected in zip(weights[: args.direct], replicates, strict=False):
        began = time.perf_counter()
        value = fid(FeatureStats.of(x, w), frechet)
        timed.append(time.perf_counter() - began)
        difference = max(difference, abs(expected - value) / abs(value))
    direct_replicate = statistics.median(timed)

    # the estimate costs the direct side about one replicate more (its statistics are merged)
    direct_config = direct_replicate * (len(weights) + 1)
    fast_config = fast_setup + fast_replicate * len(weights)
    print(
        f"\nd = {d}: {args.images} images ({prompts} prompts), reference {args.reference}, "
        f"{len(weights)} replicates drawing {drawn.min()}-{drawn.max()} images"
    )
    print(f"{'':36}{'direct':>10}{'fast':>10}{'ratio':>8}")
    rows = [
        ("seconds per replicate", direct_replicate, fast_replicate, "10.4f"),
        ("seconds per configuration", direct_config, fast_config, "10.2f"),
        (
            f"{args.configs} configurations, minutes",
            direct_config * args.configs / 60,
            fast_config * args.configs / 60,
            "10.1f",
        ),
    ]
    for label, slow, quick, spec in rows:
        print(f"{label:36}{slow:{spec}}{quick:{spec}}{slow / quick:8.1f}")
    print(
        f"largest relative difference, {len(timed)} replicates: {difference:.1e}\n"
        f"direct: median of {len(timed)} replicates; fast: median of {args.measure} "
        f"configurations, per configuration {fast_setup:.2f} s projection and estimate"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, action="append", help="feature dimension (repeatable)")
    parser.add_argument("--images", type=int, default=1000, help="images per configuration")
    parser.add_argument("--per-prompt", type=int, default=1, help="images per prompt")
    parser.add_argument("--reference", type=int, default=10_000, help="reference images")
    parser.add_argument("--replicates", type=int, default=200, help="bootstrap replicates")
    parser.add_argument("--configs", type=int, default=120, help="configurations projected to")
    parser.add_argument("--measure", type=int, default=2, help="configurations timed (fast)")
    parser.add_argument("--direct", type=int, default=3, help="replicates timed (direct)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        help="threads of numpy's and torch's BLAS and LAPACK (default: theirs, every core)",
    )
    args = parser.parse_args()
    args.dim = args.dim or [2048, 1024]

    # numpy's BLAS reads its thread count once, when it loads: set it and start again.
    if args.threads and os.environ.get(THREAD_VARIABLES[0]) != str(args.threads):
        os.environ.update(dict.fromkeys(THREAD_VARIABLES, str(args.threads)))
        os.execv(sys.executable, [sys.executable, *sys.argv])
    print(f"FID bootstrap, {torch.get_num_threads()} threads on {os.cpu_count()} CPUs")
    for d in args.dim:
        fid_bootstrap(args, d)


if __name__ == "__main__":
    main()
