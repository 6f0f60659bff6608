"""metrics.json, typed: the provenance of an evaluation, written last (it says the metrics are
complete) and read back by the report. Its JSON form is defined here and nowhere else."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from sdbatch.errors import InputError
from sdbatch.evaluation.extractors import ExtractorInfo
from sdbatch.evaluation.suite import Suite
from sdbatch.models import ModelSource
from sdbatch.output import METRICS_DIR, Output
from sdbatch.typed_data import from_data

METRICS_RECORD = f"{METRICS_DIR}/metrics.json"
TRUNCATION = "prompts longer than CLIP's context are cut to it, keeping end-of-text"


@dataclass(frozen=True)
class ReferenceProvenance:
    """What FID and KID were computed against."""

    source: str  # the reference images, or the .npz given
    cache: str | None  # where the statistics computed from images are kept
    sha256: str  # of mu and sigma
    count: int  # images behind the statistics (0 when a .npz does not say)
    has_features: bool  # KID needs them
    meta: dict[str, Any]  # the provenance stored in the statistics file


@dataclass(frozen=True)
class MetricsRecord:
    """metrics.json: the suite, the identities of the models and the reference, the counts of
    images flagged, excluded and truncated, library versions, and the workers."""

    finished: str  # ISO 8601, UTC
    suite: Suite
    clip: ModelSource | None
    extractor: ExtractorInfo | None
    reference: ReferenceProvenance | None
    images: int
    versions: dict[str, str]
    workers: tuple[dict[str, Any], ...]  # the feature workers
    seconds: float
    # The suite's `safety` policy decides whether flagged images count in the metrics; the two
    # counts are absent from records written before it existed.
    flagged_images: int = 0
    excluded_images: int = 0
    truncated_prompts: int = 0
    truncation: str = TRUNCATION
    intervals: dict[str, str] = dataclasses.field(default_factory=dict)  # metric -> method
    # What a bootstrap replicate resamples: "prompt" (each with all its images); records without
    # it resampled single images.
    bootstrap_unit: str = "image"
    # Two runs' replicates pair (evaluation.compare) when these are equal: same prompts, samples
    # and seed.
    bootstrap_draws: str = ""
    # The actors that computed configurations' metrics (evaluation.table), with how many each;
    # none where the driver computed them all.
    table_workers: tuple[dict[str, Any], ...] = ()
    format: int = 1

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, body: bytes | str) -> MetricsRecord:
        return from_data(cls, json.loads(body))


def write_metrics_record(out: Output, record: MetricsRecord) -> None:
    body = record.to_json()
    out.put(METRICS_RECORD, lambda tmp: out.fs.pipe_file(tmp, body))


def read_metrics_record(out: Output) -> MetricsRecord | None:
    """The output's metrics record, or None before it was evaluated.

    Raises:
        InputError: metrics.json is there but is not a record sdbatch reads.
    """
    path = out.path(METRICS_RECORD)
    if not out.fs.exists(path):
        return None
    try:
        return MetricsRecord.from_json(out.fs.cat_file(path))
    except (InputError, ValueError, TypeError) as e:
        raise InputError(f"OUT: {path} is not a metrics record sdbatch reads ({e})") from None
