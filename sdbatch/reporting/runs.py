"""An evaluated output as the report reads it: its per-configuration table and its two records."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from sdbatch.errors import InputError
from sdbatch.evaluation.metric import Metric
from sdbatch.evaluation.record import MetricsRecord, read_metrics_record
from sdbatch.output import METRICS_DIR, Output
from sdbatch.records import RunRecord

PARAMS = ["scheduler", "num_inference_steps", "guidance_scale"]


@dataclass
class Run:
    """One evaluated output."""

    name: str
    out: Output
    configs: pd.DataFrame
    metrics: MetricsRecord
    record: RunRecord
    # metrics/*.parquet written since sdbatch paired its statistics (None: evaluated before)
    differences: pd.DataFrame | None = None  # the best configuration against every other, paired
    effects: pd.DataFrame | None = None  # each sweep axis's levels, averaged over the others
    replicates: pd.DataFrame | None = None  # per configuration and bootstrap replicate

    def has(self, column: str) -> bool:
        """Whether some configuration has a value in `column`."""
        return column in self.configs and self.configs[column].notna().any()

    def has_metric(self, metric: Metric) -> bool:
        return self.has(metric.headline.column)


def load_run(location: str) -> Run:
    """Read an evaluated output; InputError when it has no metrics yet."""
    out = Output(location)
    record = out.read_run()
    metrics = read_metrics_record(out) if record is not None else None
    if record is None or metrics is None:
        raise InputError(f"OUT: {location} has no metrics/metrics.json; run sdbatch eval first")
    with out.fs.open(out.path(METRICS_DIR, "configs.parquet"), "rb") as f:
        configs = pd.read_parquet(f).sort_values(PARAMS, ignore_index=True)
    if "unet_evals_per_image" not in configs:
        # evaluated before sdbatch recorded the cost: it follows from each configuration
        evals = {c.config_id: c.unet_evals_per_image for c in record.configs}
        configs["unet_evals_per_image"] = configs["config_id"].map(evals)
    paired = [_optional_table(out, name) for name in ("differences", "effects", "replicates")]
    return Run(record.spec.name, out, configs, metrics, record, *paired)


def _optional_table(out: Output, name: str) -> pd.DataFrame | None:
    path = out.path(METRICS_DIR, f"{name}.parquet")
    if not out.fs.exists(path):
        return None
    with out.fs.open(path, "rb") as f:
        return pd.read_parquet(f)
