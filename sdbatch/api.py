"""`sdbatch run`, as a function: generate a spec's images, evaluate them with its suite, and write
the report; the composition the CLI's `run` and `demo` commands are made of. And `sdbatch pull`:
a spec's models cached on every node before a run."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from sdbatch import distribute
from sdbatch.errors import InputError
from sdbatch.evaluation.extractors import DINOV2
from sdbatch.evaluation.inputs import resolve_suite
from sdbatch.evaluation.run import EvalSummary, check_sources, evaluate
from sdbatch.evaluation.suite import Suite, load_suite
from sdbatch.generation import GenerateSummary, generate
from sdbatch.models import CLIP, PIPELINE, ModelKind, ModelSource, fetch_models, resolve_model
from sdbatch.reporting.write import write_report
from sdbatch.spec import JobSpec
from sdbatch.worker import ACTOR_ENV

log = logging.getLogger("sdbatch")


@dataclass(frozen=True)
class RunSummary:
    """What a run did: generation always; evaluation and the report once every image exists."""

    generation: GenerateSummary
    evaluation: EvalSummary | None = None
    report: str | None = None  # the path of index.html

    @property
    def complete(self) -> bool:
        return not self.generation.failed


def run(
    spec: JobSpec,
    *,
    suite: Suite | None = None,
    output: str | None = None,
    address: str | None = None,
    overwrite: bool = False,
    confirmed: bool = False,
    force: bool = False,
) -> RunSummary:
    """Generate, evaluate and report; resumable like each of them.

    Args:
        suite: default: the suite the spec names (its `suite:`).
        output, address, overwrite, confirmed, force: as for `generate`.

    Raises:
        InputError: a bad spec or suite, or none named; checked before generation starts.
        JobFailed: generation or evaluation broke; finished work is kept and a rerun resumes.
    """
    # 1. the suite, its models and its reference are checked first: a typo in the suite costs
    #    no GPU time
    if suite is None:
        if spec.suite is None:
            raise InputError(
                "suite: the job spec names no evaluation suite; add `suite:` or --suite"
            )
        suite = load_suite(spec.suite)
    check_sources(suite, spec.task != "text2img", "the job's task is text2img")
    inputs = resolve_suite(suite)
    # 2. generate
    generated = generate(
        spec,
        output=output,
        address=address,
        overwrite=overwrite,
        confirmed=confirmed,
        force=force,
    )
    if generated.failed:
        # Metrics of configurations with missing images would be silently biased.
        log.warning("generation is incomplete: not evaluating until a rerun makes every image")
        return RunSummary(generated)
    # 3. evaluate, then report
    evaluated = evaluate(generated.output, suite, address=address, inputs=inputs)
    return RunSummary(generated, evaluated, write_report(generated.output))


def pull(
    spec: JobSpec, *, suite: Suite | None = None, address: str | None = None
) -> dict[str, dict[str, str]]:
    """Cache the spec's model, and its suite's CLIP and DINOv2 models, on every node of the
    cluster at `address` (as for `generate`: default $RAY_ADDRESS, else a local Ray instance), so
    that workers load them with HF_HUB_OFFLINE=1 and a run does not download them on each node.

    Returns: by node (its host name and id), where each model's files are.

    Raises:
        InputError: a bad spec, suite or model reference (before any node is asked).
        JobFailed: a node cannot fetch a model (offline, out of space, its folder missing).
    """
    # 1. pin every model here, so that every node fetches the same commit
    model = resolve_model(spec.model, spec.model_revision, allow_pickle=spec.model_allow_pickle)
    models: list[tuple[ModelSource, ModelKind]] = [(model, PIPELINE)]
    if suite is None and spec.suite is not None:
        suite = load_suite(spec.suite)
    if suite is not None:
        inputs = resolve_suite(suite)
        if inputs.clip is not None:
            models.append((inputs.clip, CLIP))
        if inputs.extractor is not None and inputs.extractor.model is not None:
            models.append((inputs.extractor.model, DINOV2))
    # 2. fetch them on every node of the cluster generate would run on (a local one included)
    with distribute.session(address):
        return distribute.on_every_node(fetch_models, models, env=ACTOR_ENV)


def demo_spec() -> Path:
    """jobs/demo.yaml from the source checkout, or from where pip installed the jobs folder."""
    for jobs in (
        Path(__file__).resolve().parents[1] / "jobs",
        Path(sys.prefix) / "share/sdbatch/jobs",
    ):
        if (jobs / "demo.yaml").is_file():
            return jobs / "demo.yaml"
    raise InputError("demo: jobs/demo.yaml is not installed; run from a source checkout")
