"""Every metric sdbatch computes, in the order of their columns in configs.parquet.

Adding a metric: a module in `sdbatch/evaluation/metrics/` that declares its `Metric` (and, if it
has settings, their dataclass, which the suite then holds as a field), and one line below.
"""

from __future__ import annotations

from sdbatch.evaluation.metric import Metric
from sdbatch.evaluation.metrics.attributes import ATTRIBUTE_ACCURACY
from sdbatch.evaluation.metrics.clip_score import CLIP_SCORE
from sdbatch.evaluation.metrics.cmmd import CMMD
from sdbatch.evaluation.metrics.directional import CLIP_DIRECTIONAL
from sdbatch.evaluation.metrics.fid import FID
from sdbatch.evaluation.metrics.kid import KID
from sdbatch.evaluation.metrics.prdc import PRDC
from sdbatch.evaluation.metrics.psnr_ssim import PSNR, SSIM

REGISTRY: dict[str, Metric] = {
    m.name: m
    for m in (CLIP_SCORE, ATTRIBUTE_ACCURACY, CLIP_DIRECTIONAL, PSNR, SSIM, FID, KID, CMMD, *PRDC)
}
# The report's trade-off, (x, y): agreement with the prompt against quality next to the reference;
# its plot, and the Pareto front of configurations no other one beats on both.
TRADEOFF = (CLIP_SCORE, FID)
# An image-conditioned run's trade-off, (x, y): agreement with the prompt against what the image
# keeps of its source (more strength buys the first with the second).
PRESERVATION_TRADEOFF = (CLIP_SCORE, SSIM)
# What the report of an image-conditioned run plots against strength, in this order.
STRENGTH_METRICS = (ATTRIBUTE_ACCURACY, CLIP_SCORE, CLIP_DIRECTIONAL, PSNR, SSIM)


def metrics_named(names: tuple[str, ...]) -> list[Metric]:
    """The metrics with these names, in the registry's order."""
    return [m for m in REGISTRY.values() if m.name in names]


def ranked_metrics() -> list[Metric]:
    """The metrics the report ranks configurations by and plots, in the registry's order."""
    return [m for m in REGISTRY.values() if m.ranked]
