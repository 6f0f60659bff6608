"""FID (Heusel et al. 2017): the Fréchet distance between Gaussians fitted to the features of a
configuration's images and of the reference, from merged sufficient statistics in float64."""

from __future__ import annotations

import logging
import math
from typing import Any

from sdbatch.evaluation.metric import QUALITY, ConfigGroup, Interval, Metric, Need, Score
from sdbatch.evaluation.metric_math import fid

log = logging.getLogger("sdbatch")


def aggregate(group: ConfigGroup, settings: Any) -> dict[str, Any]:
    n, dim = (group.stats.count if group.stats else 0), group.feature_dim
    row: dict[str, Any] = {"fid": fid(group.stats, group.frechet) if n >= 2 else math.nan}
    # With fewer images than dimensions the covariance is singular: FID is biased upwards.
    row["fid_ill_conditioned"] = n < dim
    if n < dim and group.weights is None:  # said once, for the estimate
        log.warning(
            "%s: %d images < %d feature dimensions: FID is biased upwards and ill-conditioned; "
            "compare it only at equal n, or use KID",
            group.config_id, n, dim,
        )  # fmt: skip
    return row


FID = Metric(
    name="fid",
    label="FID",
    higher_is_better=False,
    judges=QUALITY,
    needs=frozenset({Need.FEATURES, Need.REFERENCE}),
    # Resampling repeats images, which biases every replicate's FID upwards: percentiles would
    # not even bracket the estimate.
    interval=Interval.NORMAL,
    aggregate=aggregate,
    scores=(Score("fid", "FID"),),
    ranked=True,
    least=0.0,
)
