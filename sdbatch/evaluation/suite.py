"""The evaluation suite: which metrics, computed with which models, against which reference.

Like a job spec, a suite checks its own fields when it is made, from YAML or in Python; each
section is declared beside what it configures (`clip:` in evaluation.clip, `fid:` in
evaluation.extractors, `kid:` in metrics.kid, `prdc:` in metrics.prdc, `reference:` in
evaluation.reference, `bootstrap:` in evaluation.metric). Files it names are checked by
`check_files`, before any work.

Example:
    >>> suite = load_suite("eval/demo.yaml")
    >>> suite.metrics[:4], suite.clip.model
    (('clip_score', 'fid', 'kid', 'attribute_accuracy'), 'builtin:toy-clip')
    >>> [m.label for m in suite.chosen_metrics][:5]
    ['CLIP score', 'attribute accuracy', 'FID', 'KID', 'CMMD']
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sdbatch.evaluation.clip import ClipSettings
from sdbatch.evaluation.extractors import FidSettings
from sdbatch.evaluation.metric import Bootstrap, Metric, Need
from sdbatch.evaluation.metrics.kid import KidSettings
from sdbatch.evaluation.metrics.prdc import PrdcSettings
from sdbatch.evaluation.reference import ReferenceSource
from sdbatch.evaluation.registry import REGISTRY, metrics_named
from sdbatch.spec import MAX_ACTORS, MAX_BATCH_SIZE, MAX_RETRIES
from sdbatch.typed_data import (
    conform,
    file_name,
    from_data,
    known,
    read_yaml,
    relative_to,
    require,
    within,
)

DEFAULT_CACHE = "~/.cache/sdbatch/reference"


@dataclass(frozen=True)
class EvalRuntime:
    """How feature extraction runs; never changes a number."""

    actors: int | Literal["auto"] = "auto"
    batch_size: int = 32
    retries: int = 2  # as in a job spec's runtime

    def __post_init__(self) -> None:
        conform(self)
        if self.actors != "auto":
            within(self.actors, 1, MAX_ACTORS, "actors", "or auto: one per GPU")
        within(self.batch_size, 1, MAX_BATCH_SIZE, "batch_size")
        within(self.retries, 0, MAX_RETRIES, "retries")


@dataclass(frozen=True)
class Suite:
    """An evaluation suite: which metrics, computed with which models, against which reference."""

    name: str
    metrics: tuple[str, ...] = ("clip_score", "fid", "kid")
    # Images the model's safety checker flagged (and blacked out): left out of every metric of
    # their configuration, or scored like the others.
    safety: Literal["exclude", "include"] = "exclude"
    clip: ClipSettings = field(default_factory=ClipSettings)
    fid: FidSettings = field(default_factory=FidSettings)
    kid: KidSettings = field(default_factory=KidSettings)
    prdc: PrdcSettings = field(default_factory=PrdcSettings)
    reference: ReferenceSource | None = None
    bootstrap: Bootstrap = field(default_factory=Bootstrap)
    cache: str = DEFAULT_CACHE  # where computed reference statistics are kept
    runtime: EvalRuntime = EvalRuntime()

    def __post_init__(self) -> None:
        conform(self)
        file_name(self.name, "name")  # a label, held to the job spec's rule
        known(self.metrics, REGISTRY, "metrics", "metric")
        needing = [m.name for m in self.chosen_metrics if Need.REFERENCE in m.needs]
        if needing:
            require(
                self.reference is not None,
                "reference",
                f"required by metric {needing[0]}: images or stats",
            )

    @property
    def chosen_metrics(self) -> list[Metric]:
        """The suite's metrics, in the registry's order (the order of their columns)."""
        return metrics_named(self.metrics)

    def needs(self, need: Need) -> bool:
        return any(need in m.needs for m in self.chosen_metrics)

    def settings_of(self, metric: Metric) -> Any:
        """The suite section a metric reads (its `settings`), or None."""
        return getattr(self, metric.settings) if metric.settings else None


def load_suite(path: str | Path) -> Suite:
    """Read and validate an evaluation suite; its file paths are relative to the suite file.

    Raises:
        InputError: the file is missing, is not YAML, a field is wrong, or a file it names is
            missing.
    """
    path = Path(path)
    data = read_yaml(path, "suite", "eval/demo.yaml")
    reference = data.get("reference")
    if isinstance(reference, dict):
        for key in ("images", "stats"):
            if isinstance(reference.get(key), str):
                reference[key] = relative_to(reference[key], path.parent)
    fid = data.get("fid")
    if isinstance(fid, dict) and isinstance(fid.get("weights"), str):
        fid["weights"] = relative_to(fid["weights"], path.parent)
    return parse_suite(data)


def parse_suite(data: dict[str, Any]) -> Suite:
    """Build a `Suite` from plain data (parsed YAML), check every field and the files it names."""
    suite = from_data(Suite, data)
    check_files(suite)
    return suite


def check_files(suite: Suite) -> None:
    """The local files a suite names exist (a suite read back from metrics.json, on another
    machine, need not have them)."""
    if suite.fid.weights is not None:
        require(
            # os.path.isfile, unlike Path.is_file, says False for a name too long to be a file
            os.path.isfile(Path(suite.fid.weights).expanduser()),  # noqa: PTH113
            "fid.weights",
            f"no weights file at {suite.fid.weights}",
        )
    stats = suite.reference.stats if suite.reference else None
    if stats is not None:
        exists = "://" in stats or os.path.isfile(stats)  # noqa: PTH113
        require(exists, "reference.stats", f"no file at {stats}")
