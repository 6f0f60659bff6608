"""An evaluated output as the report reads it: its per-configuration table and its two records."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from sdbatch.errors import InputError
from sdbatch.evaluation.compare import model_name, model_names
from sdbatch.evaluation.metric import Metric
from sdbatch.evaluation.record import MetricsRecord, read_metrics_record
from sdbatch.output import METRICS_DIR, SOURCES, Output
from sdbatch.records import RunRecord

PARAMS = ["scheduler", "num_inference_steps", "guidance_scale"]
# An image-conditioned task's parameters (outputs evaluated before tasks lack these columns).
TASK_PARAMS = ["strength", "outpaint"]
# The column load_run adds when a run has several models or adapters: each configuration's
# model and adapter in words (compare.model_names). Without it the report reads as for one model.
MODEL = "model_adapter"


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
    baseline: str | None = None  # the model (and adapter) compared against, when several
    sources: bool = False  # an image-conditioned run: OUT/sources.parquet holds its sources

    @property
    def models(self) -> list[str]:
        """The run's models and adapters in the sweep's order; empty when it has one."""
        return list(dict.fromkeys(self.configs[MODEL])) if MODEL in self.configs else []

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
        configs = pd.read_parquet(f)
    baseline = None
    if "model" in configs and (names := model_names(configs)).nunique() > 1:
        # models and adapters in the sweep's order (the file's), each one's configurations sorted
        configs[MODEL] = pd.Categorical(names, categories=list(dict.fromkeys(names)))
        baseline = baseline_of(configs, record.spec.baseline_setting)
    params = [*PARAMS, *(c for c in TASK_PARAMS if c in configs)]
    configs = configs.sort_values([MODEL, *params] if baseline else params, ignore_index=True)
    if baseline:
        configs[MODEL] = configs[MODEL].astype(str)
    if "unet_evals_per_image" not in configs:
        # evaluated before sdbatch recorded the cost: it follows from each configuration
        evals = {c.config_id: c.unet_evals_per_image for c in record.configs}
        configs["unet_evals_per_image"] = configs["config_id"].map(evals)
    paired = [_optional_table(out, name) for name in ("differences", "effects", "replicates")]
    sources = out.fs.exists(out.path(SOURCES))
    return Run(record.spec.name, out, configs, metrics, record, *paired, baseline, sources)


def baseline_of(configs: pd.DataFrame, named: tuple[str, str | None, float | None]) -> str:
    """The model (and adapter) the others are compared with: the spec's baseline (`named`:
    model, lora, lora_scale, defaults filled) when the run evaluated it, else the first model
    without an adapter, else the first model."""
    names = list(dict.fromkeys(configs[MODEL]))
    if (name := model_name(*named)) in names:
        return name
    plain = configs.loc[configs["lora"].isna(), MODEL]
    return str(plain.iloc[0]) if len(plain) else names[0]


def _optional_table(out: Output, name: str) -> pd.DataFrame | None:
    path = out.path(METRICS_DIR, f"{name}.parquet")
    if not out.fs.exists(path):
        return None
    with out.fs.open(path, "rb") as f:
        return pd.read_parquet(f)
