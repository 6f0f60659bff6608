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
replicates. Wall seconds grow with the machine's load (printed at the end); CPU seconds over the
threads are what idle cores would take at best.

The table section (`--section table`) times the whole per-configuration table of a sweep, FID
with its replicates and KID (100 subsets of 1000), every configuration's features and statistics
made up front: on the driver (`config_metrics` one configuration after another, numpy's and
torch's threads on every core), then on a local Ray instance's actors (`table_metrics`: the
first configuration and the reference's parts on the driver, the others on `--workers` actors,
each its share of the cores) for each `--workers`; the reference's parts are computed again by
each run. It prints each one's seconds and the largest relative difference from the driver's.

    python bench/eval_scale.py                 # d = 2048 and 1024: 1000 images, 200 replicates
    python bench/eval_scale.py --dim 2048 --threads 1
    python bench/eval_scale.py --per-prompt 4  # 250 prompts of 4 images each
    python bench/eval_scale.py --section table --dim 2048 --workers 2           # 120 configurations
    python bench/eval_scale.py --section table --dim 2048 --configs 24 --workers 1 --workers 2 \
        --no-driver
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from sdbatch import distribute
from sdbatch.evaluation.metric import Bootstrap
from sdbatch.evaluation.metric_math import (
    FeatureStats,
    FrechetReference,
    FrechetResamples,
    cluster_counts,
    fid,
)
from sdbatch.evaluation.reference import ReferenceSource, ReferenceStats
from sdbatch.evaluation.suite import Suite
from sdbatch.evaluation.table import ConfigUnit, TableContext, config_metrics, table_metrics

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def synthetic(rng: np.random.Generator, n: int, d: int, shift: float) -> np.ndarray:
    """n correlated d-dimensional vectors with a decaying spectrum, like a network's features."""
    mixing = rng.normal(size=(d, d)) / np.sqrt(1 + np.arange(d))[:, None]
    return rng.normal(size=(n, d)) @ mixing + shift


def timed(call: Callable[[], object]) -> tuple[np.ndarray, object]:
    """(wall seconds, CPU seconds of every thread of this process), and what the call returned."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = call()
    return np.array([time.perf_counter() - wall, time.process_time() - cpu]), result


def fid_bootstrap(args: argparse.Namespace, d: int, threads: int) -> None:
    """Prints the section's table for one feature dimension."""
    rng = np.random.default_rng(d)
    real = synthetic(rng, args.reference, d, shift=0.3)
    frechet = FrechetReference(real.mean(axis=0), np.cov(real, rowvar=False))
    prompts = args.images // args.per_prompt
    counts = cluster_counts(prompts, args.replicates, args.seed)
    weights = np.repeat(counts, args.per_prompt, axis=1)  # every image of a prompt: its count
    drawn = (weights > 0).sum(axis=1)

    # 1. all at once, on whole configurations: projection and estimate, then the replicates
    def prepared(x: np.ndarray) -> FrechetResamples:
        resamples = FrechetResamples(x, frechet)
        resamples.distances(np.ones((1, len(x))))  # the estimate
        return resamples

    setup, fast = [], []
    for c in range(args.measure):
        x = synthetic(rng, len(weights[0]), d, shift=0.3 + 0.01 * c)
        took, resamples = timed(lambda x=x: prepared(x))
        setup.append(took)
        took, replicates = timed(lambda r=resamples: r.distances(weights))
        fast.append(took)
    fast_setup = np.median(setup, axis=0)
    fast_replicate = np.median(fast, axis=0) / len(weights)

    # 2. direct, one replicate at a time, on the last configuration
    direct, difference = [], 0.0
    for w, expected in zip(weights[: args.direct], replicates, strict=False):
        took, value = timed(lambda w=w: fid(FeatureStats.of(x, w), frechet))
        direct.append(took)
        difference = max(difference, abs(expected - value) / abs(value))
    direct_replicate = np.median(direct, axis=0)

    # the estimate costs the direct side about one replicate more (its statistics are merged)
    direct_config = direct_replicate * (len(weights) + 1)
    fast_config = fast_setup + fast_replicate * len(weights)
    print(
        f"\nd = {d}: {args.images} images ({prompts} prompts), reference {args.reference}, "
        f"{len(weights)} replicates drawing {drawn.min()}-{drawn.max()} images"
    )
    print(f"{'':40}{'direct':>10}{'fast':>10}{'ratio':>8}")
    sweep = args.configs / 60
    rows = [
        ("seconds per replicate", direct_replicate[0], fast_replicate[0], "10.4f"),
        ("  CPU seconds per replicate", direct_replicate[1], fast_replicate[1], "10.4f"),
        ("seconds per configuration", direct_config[0], fast_config[0], "10.2f"),
        (
            f"{args.configs} configurations, minutes",
            *(sweep * direct_config[0], sweep * fast_config[0]),
            "10.1f",
        ),
        (
            f"  CPU / {threads} (idle cores, at best)",
            *(sweep * direct_config[1] / threads, sweep * fast_config[1] / threads),
            "10.1f",
        ),
    ]
    for label, slow, quick, spec in rows:
        print(f"{label:40}{slow:{spec}}{quick:{spec}}{slow / quick:8.1f}")
    print(
        f"largest relative difference, {len(direct)} replicates: {difference:.1e}\n"
        f"direct: median of {len(direct)} replicates; fast: median of {args.measure} "
        f"configurations, each {fast_setup[0]:.2f} s projection and estimate"
    )


def sweep_table(args: argparse.Namespace, d: int) -> None:
    """Prints the table section: driver and actors on the same configurations."""
    # 1. a reference and the configurations' features (each its own noise and shift)
    rng = np.random.default_rng(d)
    began = time.perf_counter()
    real = synthetic(rng, args.reference, d, shift=0.3)
    stats = FeatureStats.of(real)
    reference = ReferenceStats(stats.mean(), stats.covariance(), len(real), real.astype(np.float32))
    base = synthetic(rng, args.images, d, shift=0.3)
    prompts = [f"p{i:05d}" for i in range(args.images // args.per_prompt)]
    images = pd.DataFrame({"prompt_id": np.repeat(prompts, args.per_prompt)})
    units = []
    for c in range(args.configs):
        x = (base + rng.normal(scale=0.3, size=base.shape) + 0.01 * c).astype(np.float32)
        units.append(ConfigUnit(f"c{c:03d}", images, FeatureStats.of(x), x, None))
    suite = Suite(
        name="bench",
        metrics=("fid", "kid"),
        reference=ReferenceSource(stats="synthetic.npz"),
        bootstrap=Bootstrap(samples=args.replicates, seed=args.seed),
    )
    print(
        f"\ntable, d = {d}: {args.configs} configurations of {args.images} images "
        f"({len(prompts)} prompts), reference {args.reference}, {args.replicates} replicates, "
        f"FID and KID ({suite.kid.subsets} subsets of {suite.kid.subset_size}); "
        f"made in {time.perf_counter() - began:.0f} s"
    )

    def context() -> TableContext:  # none of the reference's parts computed yet
        fresh = dataclasses.replace(reference, derived={})
        return TableContext.of(suite, fresh, d, images["prompt_id"])

    # 2. the driver, then the actors, each line printed when done
    print(f"{'':32}{'seconds':>10}{'minutes':>10}{'s/config':>10}{'max rel. diff':>16}", flush=True)
    baseline: dict = {}

    def report(label: str, seconds: float, computed: dict) -> None:
        difference = max(
            float(np.nanmax(np.abs(np.asarray(got[name]) / np.asarray(expected) - 1), initial=0))
            for config_id, pair in (baseline or computed).items()
            for part, got in zip(pair, computed[config_id], strict=True)
            for name, expected in part.items()
            if isinstance(expected, (float, np.ndarray))
        )
        baseline.update(baseline or computed)
        per_config = seconds / args.configs
        print(
            f"{label:32}{seconds:10.1f}{seconds / 60:10.2f}{per_config:10.2f}{difference:16.1e}",
            flush=True,
        )

    if args.driver:
        took, computed = timed(lambda: {u.unit_id: config_metrics(u, context()) for u in units})
        report(f"driver, {torch.get_num_threads()} threads", took[0], computed)
    with distribute.session(None):
        for workers in args.workers or [os.cpu_count()]:
            took, computed = timed(
                lambda w=workers: table_metrics(units, context(), True, w, start_seconds=0).results
            )
            threads = max(1, os.cpu_count() // workers)
            report(f"{workers} actor(s), {threads} thread(s) each", took[0], computed)
    print("seconds: wall, from the first configuration to the last; actors: their start included")


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
    parser.add_argument("--section", choices=("fid", "table"), default="fid")
    parser.add_argument(
        "--workers", type=int, action="append", help="table: actors (repeatable; default: CPUs)"
    )
    parser.add_argument(
        "--driver", action=argparse.BooleanOptionalAction, default=True, help="table: time it"
    )
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
    threads = torch.get_num_threads()
    before = os.getloadavg()[0]
    if args.section == "table":
        logging.getLogger("sdbatch").setLevel(logging.ERROR)  # FID's n < d warning, each config
        for d in args.dim:
            sweep_table(args, d)
    else:
        print(f"FID bootstrap, {threads} threads on {os.cpu_count()} CPUs")
        for d in args.dim:
            fid_bootstrap(args, d, threads)
    # On a shared machine other processes take CPUs: the wall times grow, the CPU times less.
    print(f"\nload average {before:.1f} before, {os.getloadavg()[0]:.1f} after")


if __name__ == "__main__":
    main()
