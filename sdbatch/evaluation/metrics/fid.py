"""FID (Heusel et al. 2017): the Fréchet distance between Gaussians fitted to the features of a
configuration's images and of the reference, from merged sufficient statistics in float64.

Its bootstrap replicates are computed all at once from the features projected once by the
reference's square root (`FrechetResamples`): a replicate that draws k images costs one
min(k, d)-sized eigensolve instead of a covariance and d x d products and eigensolve; the numbers
are the same. With fewer images than dimensions the estimate takes that path too.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from sdbatch.evaluation.metric import QUALITY, ConfigGroup, Interval, Metric, Need, Score
from sdbatch.evaluation.metric_math import fid


def aggregate(group: ConfigGroup, settings: Any) -> dict[str, Any]:
    n, dim = (group.stats.count if group.stats else 0), group.feature_dim
    if n < 2:
        value = math.nan
    elif group.weights is None and n < dim:
        # an n x n eigensolve instead of a d x d one
        value = float(group.frechet_resamples.distances(np.ones((1, n)))[0])
    else:
        value = fid(group.stats, group.frechet)
    # With fewer images than dimensions the covariance is singular: FID is biased upwards.
    return {"fid": value, "fid_ill_conditioned": n < dim}


def caveat(table: pd.DataFrame) -> str | None:
    """Once per table, not per configuration: a sweep's configurations have the same n."""
    ill = table["fid_ill_conditioned"].astype(bool)
    if not ill.any():
        return None
    counted = table.loc[ill, "n_images"] - table.loc[ill, "n_excluded"]
    return (
        f"FID of {int(ill.sum())} of {len(table)} configurations ({counted.min()} to "
        f"{counted.max()} images) has fewer images than feature dimensions: biased upwards and "
        "ill-conditioned; compare it only at equal n, or use KID (configs.parquet: "
        "fid_ill_conditioned)"
    )


def replicates(group: ConfigGroup, settings: Any, weights: np.ndarray) -> dict[str, np.ndarray]:
    """FID of every bootstrap replicate: `aggregate`'s numbers on each resampled group."""
    return {"fid": group.frechet_resamples.distances(weights)}


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
    replicates=replicates,
    scores=(Score("fid", "FID"),),
    ranked=True,
    least=0.0,
    caveat=caveat,
)
