"""KID (Binkowski et al. 2018, "Demystifying MMD GANs") on the extractor's features: the unbiased
MMD² with torchmetrics' polynomial kernel, mean and std over random subsets drawn from the
bootstrap seed (`KidReference`). The reference's kernel sums are computed once per reference
(`ConfigGroup.per_reference`), so a configuration costs its own kernels only. It needs the
reference's features, which sdbatch's cached statistics keep; a .npz of mu and sigma alone gives
NaN."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sdbatch.evaluation.kid_math import KidReference
from sdbatch.evaluation.metric import QUALITY, ConfigGroup, Interval, Metric, Need, Score
from sdbatch.typed_data import conform, within

# torchmetrics' defaults are 100 subsets of 1,000. A configuration of n images costs an n x n and
# an n x (reference rows drawn) kernel; the reference, once, its rows drawn squared.
MAX_SUBSETS = 10_000
MAX_SUBSET_SIZE = 100_000


@dataclass(frozen=True)
class KidSettings:
    """KID's subset sampling (a suite's `kid:`)."""

    subsets: int = 100
    # Lowered to the smaller set's size when needed (KID is unbiased at any size); recorded.
    subset_size: int = 1000

    def __post_init__(self) -> None:
        conform(self)
        within(self.subsets, 1, MAX_SUBSETS, "subsets")
        within(self.subset_size, 2, MAX_SUBSET_SIZE, "subset_size")


def aggregate(group: ConfigGroup, settings: KidSettings) -> dict[str, Any]:
    if group.reference.features is None:
        return {"kid_mean": math.nan, "kid_std": math.nan}
    features = group.reference.features
    kernels = group.per_reference("kid", lambda: KidReference(features))
    mean, std, size = kernels.kid(
        group.features, settings.subsets, settings.subset_size, group.bootstrap.seed
    )
    return {"kid_mean": mean, "kid_std": std, "kid_subset_size": size}


KID = Metric(
    name="kid",
    label="KID",
    higher_is_better=False,
    judges=QUALITY,
    needs=frozenset({Need.FEATURES, Need.REFERENCE}),
    interval=Interval.NONE,
    aggregate=aggregate,
    scores=(Score("kid_mean", "KID", interval=False, spread="kid_std", digits=4),),
    settings="kid",
)
