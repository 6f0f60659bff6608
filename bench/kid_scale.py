"""Benchmark: KID per configuration at real feature sizes, torchmetrics against sdbatch.

torchmetrics' KernelInceptionDistance (what sdbatch ran before) recomputes every subset's reference
kernels for each configuration: 3 x subsets kernels of subset_size^2 x d. sdbatch's KidReference
computes the reference's part once per evaluation, then per configuration one n x n and one
n x (reference rows drawn) kernel. Both run here on the same synthetic float64 features
(nonnegative, like pooled Inception or DINOv2 features): a reference of 10,000 and configurations
of 1,000, at d = 2048 and 1024, 100 subsets of 1,000 (torchmetrics' and sdbatch's defaults).

The two draw their subsets differently (torch's generator, numpy's), so their KIDs differ by
sampling. The agreement is checked on sdbatch's subsets: each subset's MMD^2 against torchmetrics'
`poly_mmd` on the same rows, the largest difference relative to KID.

    python bench/kid_scale.py                        # d = 2048 and 1024, 2 configurations each
    python bench/kid_scale.py --dims 2048 --configs 3 --check 10
    OPENBLAS_NUM_THREADS=1 python bench/kid_scale.py --threads 1     # one core for both
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import numpy as np

from sdbatch.evaluation.kid_math import KidReference, kid_subsets

TOLERANCE = 1e-6  # relative to KID
SEED = 0


def synthetic(rng: np.random.Generator, n: int, centers: np.ndarray) -> np.ndarray:
    """n nonnegative d-dimensional features: rectified Gaussians around per-dimension centers."""
    return np.maximum(rng.normal(centers, 0.5, size=(n, len(centers))), 0)


def torchmetrics_kid(args, generated: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """KID as sdbatch computed it before: a fresh KernelInceptionDistance, its draws seeded."""
    import torch
    from torchmetrics.image.kid import KernelInceptionDistance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # it keeps every feature: they are in memory
        metric = KernelInceptionDistance(
            feature=torch.nn.Identity(), subsets=args.subsets, subset_size=args.subset_size
        )
    metric.update(torch.as_tensor(reference), real=True)
    metric.update(torch.as_tensor(generated), real=False)
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        mean, std = metric.compute()
    return float(mean), float(std)


def agreement(args, kernels: KidReference, generated: np.ndarray, kid: float) -> float:
    """The largest |sdbatch - torchmetrics| over the first `--check` subsets, relative to KID,
    both on sdbatch's subsets."""
    import torch
    from torchmetrics.image.kid import poly_mmd

    ours = kernels.mmd2(generated, args.subsets, args.subset_size, SEED)
    reference = kernels.features
    rows = kid_subsets(len(reference), args.subsets, args.subset_size, SEED, reference=True)
    columns = kid_subsets(len(generated), args.subsets, args.subset_size, SEED, reference=False)
    worst = 0.0
    for s in range(min(args.check, args.subsets)):
        r = torch.as_tensor(reference[rows[s]])
        g = torch.as_tensor(generated[columns[s]])
        worst = max(worst, abs(ours[s] - float(poly_mmd(r, g))))
    return worst / abs(kid)


def timed(compute, configs: list[np.ndarray]) -> tuple[list, float, float]:
    """Each configuration's result, and the median wall and CPU seconds per configuration (CPU:
    this process's, all threads; on a busy machine the wall time also counts others' work)."""
    results, wall, cpu = [], [], []
    for generated in configs:
        began, began_cpu = time.perf_counter(), time.process_time()
        results.append(compute(generated))
        wall.append(time.perf_counter() - began)
        cpu.append(time.process_time() - began_cpu)
    return results, statistics.median(wall), statistics.median(cpu)


def measure(args, dim: int) -> bool:
    """Times both at one feature size and prints a table; returns whether they agree."""
    rng = np.random.default_rng(dim)
    centers = rng.uniform(0, 1, dim)
    reference = synthetic(rng, args.reference, centers)
    configs = [
        synthetic(rng, args.n, centers + rng.normal(0, 0.05 * (c + 1), dim))
        for c in range(args.configs)
    ]

    theirs, before, before_cpu = timed(lambda g: torchmetrics_kid(args, g, reference), configs)
    kernels = KidReference(reference)
    [_], once, once_cpu = timed(
        lambda r: kernels.subsets(args.subsets, args.subset_size, SEED), [reference]
    )
    ours, after, after_cpu = timed(
        lambda g: kernels.kid(g, args.subsets, args.subset_size, SEED), configs
    )
    worst = agreement(args, kernels, configs[0], ours[0][0])

    print(f"\nd = {dim}: n = {args.n} per configuration, reference {args.reference}, ", end="")
    print(f"{args.subsets} subsets of {args.subset_size}, median of {args.configs} configurations")
    print(f"{'':22}{'s/config':>10}{'CPU s':>8}{'once s':>8}{'CPU s':>8}", end="")
    print(f"{f'{args.total} configs, min':>20}")
    print(f"{'torchmetrics KID':22}{before:10.2f}{before_cpu:8.2f}{'':16}", end="")
    print(f"{args.total * before / 60:20.1f}")
    total = (once + args.total * after) / 60
    print(
        f"{'sdbatch KidReference':22}{after:10.2f}{after_cpu:8.2f}{once:8.2f}{once_cpu:8.2f}",
        end="",
    )
    print(f"{total:20.1f}")
    print(f"{'speed-up per config':22}{before / after:9.1f}x{before_cpu / after_cpu:7.1f}x")
    for c, (mine, their) in enumerate(zip(ours, theirs, strict=True), 1):
        print(f"  configuration {c}: KID sdbatch {mine[0]:.6f} +- {mine[1]:.6f}, ", end="")
        print(f"torchmetrics (its own draws) {their[0]:.6f} +- {their[1]:.6f}")
    checked = min(args.check, args.subsets)
    ok = worst < TOLERANCE
    print(f"  configuration 1 on the same {checked} subsets: max |sdbatch - torchmetrics", end="")
    print(f" poly_mmd| / KID = {worst:.1e} ({'OK' if ok else 'MISMATCH'}, tolerance {TOLERANCE:g})")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2048, 1024])
    parser.add_argument("--n", type=int, default=1000, help="images per configuration")
    parser.add_argument("--reference", type=int, default=10_000, help="reference images")
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--subset-size", type=int, default=1000)
    parser.add_argument("--configs", type=int, default=2, help="configurations timed")
    parser.add_argument("--check", type=int, default=100, help="subsets checked on the same rows")
    parser.add_argument("--total", type=int, default=120, help="configurations to project to")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads (default: torch's own); numpy's BLAS reads OPENBLAS_NUM_THREADS",
    )
    args = parser.parse_args()

    # Imported before any timing, which would otherwise count them in the first configuration.
    import torch
    import torchmetrics.image.kid  # noqa: F401

    if args.threads:
        torch.set_num_threads(args.threads)
    blas = os.environ.get("OPENBLAS_NUM_THREADS", "its default (one per core)")
    print(
        f"{os.cpu_count()} CPUs; {torch.get_num_threads()} torch threads, numpy BLAS {blas}; ",
        end="",
    )
    print(f"load average {os.getloadavg()[0]:.1f} at the start")
    agreed = [measure(args, dim) for dim in args.dims]
    raise SystemExit(0 if all(agreed) else 1)


if __name__ == "__main__":
    main()
