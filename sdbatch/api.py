"""`sdbatch run`, as a function: generate a spec's images, evaluate them with its suite, and write
the report; the composition the CLI's `run` and `demo` commands are made of."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from sdbatch.errors import InputError
from sdbatch.evaluation.inputs import resolve_suite
from sdbatch.evaluation.run import EvalSummary, evaluate
from sdbatch.evaluation.suite import Suite, load_suite
from sdbatch.generation import GenerateSummary, generate
from sdbatch.reporting.write import write_report
from sdbatch.spec import JobSpec

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


def demo_spec() -> Path:
    """jobs/demo.yaml from the source checkout, or from where pip installed the jobs folder."""
    for jobs in (
        Path(__file__).resolve().parents[1] / "jobs",
        Path(sys.prefix) / "share/sdbatch/jobs",
    ):
        if (jobs / "demo.yaml").is_file():
            return jobs / "demo.yaml"
    raise InputError("demo: jobs/demo.yaml is not installed; run from a source checkout")
