"""The `sdbatch` command: argument parsing and exit codes over the Python API (`sdbatch.api` and
the stages it exports). Exit codes: 0 done, 1 failed while running, 2 bad input (a Ray cluster
that does not answer --address included), 3 finished but some work units failed every retry (a
rerun retries just those), 130 interrupted (Ctrl-C, SIGINT), 143 terminated (SIGTERM). Finished
work units are kept whichever way a run ends."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from sdbatch.errors import STOP_REQUESTED, InputError, JobFailed

if TYPE_CHECKING:
    from sdbatch.generation import GenerateSummary

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INCOMPLETE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
# 128 + the signal's number, as a shell reports a process the signal ended.
EXIT_TERMINATED = 128 + signal.SIGTERM
# Set by SIGTERM, whose handler interrupts like Ctrl-C: Ray turns any exception raised in a signal
# handler during its calls into a KeyboardInterrupt, so the exception cannot say which it was.
_terminated = threading.Event()
log = logging.getLogger("sdbatch")

GENERATE_HELP = """\
Generate every image of a job spec into a Parquet dataset (OUT/images/).

Rerunning the same command resumes: finished work units are kept, unfinished
ones are redone, and no image is written twice. A rerun whose spec only adds
configurations (scheduler, steps or guidance values) or prompts extends the
output with the new images. Any other change (model, seed, size, images per
prompt, negative prompt, an edited or removed prompt or configuration) is
refused: pass --overwrite to start over, or choose another --out.

A unit whose worker dies or that raises is retried (runtime.retries times) on
any worker; one that fails every time is bisected to the prompts at fault,
which are listed in run.json; the rest completes and the exit status is 3:
rerun to retry just those. A unit that makes no progress for 10 times the
longest wait for a batch seen so far (and at least 60 s; twice that on each
later attempt) is retried the same way, on a fresh worker; a warning names it
at half that time.

One driver writes an output at a time: a second is refused, naming the
first (host, pid); --force takes the output over at once, and a driver that
stopped renewing its lease for 60 s (or whose process on this machine is
gone) is taken over by itself. A rerun checks every committed file's size
against its marker (--verify: its sha256 too) and redoes the units that do not
match.

A job of more than 100,000 images (prompts x configurations x images per
prompt) is refused unless --yes confirms it; --dry-run shows its plan anyway.

examples:
  sdbatch generate jobs/demo.yaml
  sdbatch generate jobs/my_sweep.yaml --out s3://bucket/run1 --address auto
  sdbatch generate jobs/my_sweep.yaml --dry-run
"""

PROMPTS_HELP = """\
Convert a prompt list to the Parquet format job specs read: an `id` column of
stable ids (from row position and text), a `prompt` column, and the input's
other columns. .txt is one prompt per line; .csv/.tsv need a header row;
.jsonl is one JSON object per line. Rows with a blank prompt are skipped (a
warning counts them).

examples:
  sdbatch prompts prompts.txt
  sdbatch prompts PartiPrompts.tsv -o parti.parquet --column Prompt
"""

EVAL_HELP = """\
Compute an evaluation suite's metrics (CLIP score, FID, KID) for every sweep
configuration of a generated output, into OUT/metrics/: configs.parquet and
configs.csv (one row per configuration, with bootstrap intervals),
images.parquet (per-image CLIP scores) and metrics.json (provenance).

Features are extracted on Ray actors and kept per work unit, so a rerun (after
a crash, or after generate added images) extracts only what is missing.
Reference statistics are computed once and cached (see `sdbatch reference`).

examples:
  sdbatch eval out/demo --suite eval/demo.yaml
  sdbatch eval s3://bucket/run1 --suite eval/coco.yaml --address auto
"""

REFERENCE_HELP = """\
Compute a suite's reference statistics (mu, sigma and features of the real
images, for its feature extractor) and cache them, so that every later eval
reuses them. Prints the .npz path (pytorch-fid / clean-fid format). The name
encodes the extractor, its weights hash, resize mode, resolution and the
dataset's hash; statistics are never reused when any of them changed.

example:
  sdbatch reference eval/coco.yaml
"""

VERIFY_HELP = """\
Check every committed unit of a generated output against its done marker:
the file is there, of the recorded size and sha256 (--quick: size only), made
by this run, and no image is held by two units. Prints what a rerun of
generate would redo; changes nothing. Exit status 0 when everything matches,
3 when a rerun has something to redo.

examples:
  sdbatch verify out/demo
  sdbatch verify s3://bucket/run1 --quick
"""

PULL_HELP = """\
Cache a job spec's model, and its suite's CLIP and DINOv2 models, on every
node of the Ray cluster that generate would use (--address, $RAY_ADDRESS, else
a local Ray instance): each node fetches the hub files `from_pretrained` reads,
at the commit pinned here, into its Hugging Face cache (HF_HOME). Then run with
HF_HUB_OFFLINE=1 in the workers: nothing is downloaded during the run. A model
given as a folder is checked to exist on every node.

examples:
  sdbatch pull jobs/sd15_parti.yaml --address auto
  sdbatch pull jobs/my_sweep.yaml --suite eval/coco.yaml
"""

STATUS_HELP = """\
Show how far an output is, from the output alone (Ray is never started, so it
works from any machine that reads the storage, during a run or after it):
images done / total per configuration, the units that failed every attempt
and why, the driver holding the output, images/s over the last 5 minutes and
an ETA (while a driver is running), and evaluation's progress (units whose
features are extracted, per shard key; when metrics.json was written).

examples:
  sdbatch status out/demo
  sdbatch status s3://bucket/run1 --json
"""

REPORT_HELP = """\
Write OUT/report/index.html (one self-contained file: open it from disk) and
OUT/report/report.md (the same tables and plots, for a PR or a wiki): a
recommendation (the configuration to use for quality, for prompt alignment, and
the cheapest one not worse than the best, by paired intervals), every metric's
best configuration, the sweep's main effects, plots against guidance and steps
and the trade-off, image grids with the same seed across configurations, the
best configuration's lowest-scoring images, every configuration, provenance.

Given two outputs A and B (two models, or two checkpoints), it compares them per
configuration and writes the comparison to A/report/vs-B/index.html (B's run
name), leaving A's own report in place.

examples:
  sdbatch report out/demo
  sdbatch report out/demo --prompts 8 --prompt 000005-6af2dbb7
  sdbatch report out/sd15 out/sd15-finetuned   # -> out/sd15/report/vs-sd15-finetuned/
"""

RUN_HELP = """\
Generate a job spec's images, evaluate them with the suite the spec names
(`suite:`, or --suite), and write the report. Resumable like generate and eval.
Prints the report's path.

example:
  sdbatch run jobs/demo.yaml
"""

DEMO_HELP = """\
Run jobs/demo.yaml end to end on the embedded models (builtin:toy to generate,
builtin:toy-clip to evaluate) with a local Ray instance: generate, evaluate
with eval/demo.yaml, write the report. Prints the report's path.

example:
  sdbatch demo --out /tmp/sdbatch-demo
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sdbatch` console script; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(format="sdbatch: %(message)s", level=logging.WARNING)
    log.setLevel(logging.INFO)
    # SIGTERM (Slurm, Kubernetes, `timeout`) stops a run the way Ctrl-C does.
    _terminated.clear()
    STOP_REQUESTED.clear()
    sigint = signal.signal(signal.SIGINT, _stop)
    sigterm = signal.signal(signal.SIGTERM, _stop)
    try:
        return args.handler(args)
    except InputError as e:
        print(f"sdbatch: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except JobFailed as e:
        print(f"sdbatch: failed: {e}", file=sys.stderr)
        print("sdbatch: finished units are kept; rerun the same command to resume", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        how = "terminated (SIGTERM)" if _terminated.is_set() else "interrupted"
        print(f"sdbatch: {how}; rerun the same command to resume", file=sys.stderr)
        return EXIT_TERMINATED if _terminated.is_set() else EXIT_INTERRUPTED
    except Exception:
        traceback.print_exc()
        return EXIT_FAILED
    finally:
        signal.signal(signal.SIGINT, sigint)
        signal.signal(signal.SIGTERM, sigterm)


def _stop(signum: int, frame: object) -> None:
    if signum == signal.SIGTERM:
        _terminated.set()
    STOP_REQUESTED.set()
    raise KeyboardInterrupt


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdbatch",
        description="Generate Stable Diffusion image sweeps on a Ray cluster, resumably.",
        epilog="exit codes: 0 done, 1 failed, 2 bad input or no cluster at --address, 3 some "
        "work units failed every retry, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM); "
        "finished work units are kept, and rerunning the same command resumes",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter

    gen = commands.add_parser(
        "generate",
        help="generate a job spec's images",
        description=GENERATE_HELP,
        formatter_class=raw,
    )
    gen.add_argument("spec", help="job spec YAML, e.g. jobs/demo.yaml")
    _add_run_options(gen)
    gen.add_argument("--dry-run", action="store_true", help="check inputs and show the plan only")
    gen.add_argument(
        "--verify", action="store_true", help="check committed files' sha256, not only sizes"
    )
    gen.set_defaults(handler=_generate)

    prompts = commands.add_parser(
        "prompts",
        help="convert a prompt list to Parquet",
        description=PROMPTS_HELP,
        formatter_class=raw,
    )
    prompts.add_argument("input", help="a .txt, .csv, .tsv or .jsonl file (local path or URI)")
    prompts.add_argument(
        "-o", "--output", help="Parquet file to write (default: INPUT with .parquet)"
    )
    prompts.add_argument("--column", help="column holding the prompt text (default: guessed)")
    prompts.add_argument("--id-column", help="keep this column's values as ids instead of deriving")
    prompts.set_defaults(handler=_prompts)

    evaluate = commands.add_parser(
        "eval", help="compute metrics per configuration", description=EVAL_HELP, formatter_class=raw
    )
    evaluate.add_argument("output", metavar="OUT", help="a generated output folder or URI")
    evaluate.add_argument(
        "--suite", help="evaluation suite YAML (default: the suite the job spec named)"
    )
    _add_address(evaluate)
    evaluate.set_defaults(handler=_eval)

    reference = commands.add_parser(
        "reference",
        help="compute and cache a suite's reference statistics",
        description=REFERENCE_HELP,
        formatter_class=raw,
    )
    reference.add_argument("suite", help="evaluation suite YAML, e.g. eval/coco.yaml")
    _add_address(reference)
    reference.set_defaults(handler=_reference)

    check = commands.add_parser(
        "verify",
        help="check an output's committed files against their markers",
        description=VERIFY_HELP,
        formatter_class=raw,
    )
    check.add_argument("output", metavar="OUT", help="a generated output folder or URI")
    check.add_argument("--quick", action="store_true", help="check sizes only, not sha256")
    check.set_defaults(handler=_verify)

    fetch = commands.add_parser(
        "pull",
        help="cache a spec's models on every node",
        description=PULL_HELP,
        formatter_class=raw,
    )
    fetch.add_argument("spec", help="job spec YAML, e.g. jobs/demo.yaml")
    fetch.add_argument("--suite", help="evaluation suite YAML (default: the spec's `suite`)")
    _add_address(fetch)
    fetch.set_defaults(handler=_pull)

    progress = commands.add_parser(
        "status",
        help="how far an output is: images, failures, pace and ETA, eval",
        description=STATUS_HELP,
        formatter_class=raw,
    )
    progress.add_argument("output", metavar="OUT", help="an output folder or URI")
    progress.add_argument("--json", action="store_true", help="print JSON, for scripts")
    progress.set_defaults(handler=_status)

    report = commands.add_parser(
        "report",
        help="write the HTML/Markdown report",
        description=REPORT_HELP,
        formatter_class=raw,
    )
    report.add_argument("outputs", metavar="OUT", nargs="+", help="one output, or two to compare")
    report.add_argument(
        "--prompts", type=_prompt_choice, metavar="N|ID,ID,...",
        help="the image grids' prompts: how many, spread evenly across the prompt set "
        "(default 4), or which prompt ids",
    )  # fmt: skip
    report.add_argument(
        "--prompt", metavar="ID", help="also show every image of this prompt id (each "
        "configuration, each sample)",
    )  # fmt: skip
    report.set_defaults(handler=_report)

    run = commands.add_parser(
        "run", help="generate, evaluate, report", description=RUN_HELP, formatter_class=raw
    )
    run.add_argument("spec", help="job spec YAML, e.g. jobs/demo.yaml")
    run.add_argument("--suite", help="evaluation suite YAML (default: the spec's `suite`)")
    _add_run_options(run)
    run.set_defaults(handler=_run)

    demo = commands.add_parser(
        "demo", help="run jobs/demo.yaml end to end", description=DEMO_HELP, formatter_class=raw
    )
    _add_run_options(demo)
    demo.set_defaults(handler=_run, spec=None, suite=None)
    return parser


def _prompt_choice(text: str) -> int | list[str]:
    """--prompts: a count, or comma-separated prompt ids."""
    if text.isdigit():
        return int(text)
    return [p.strip() for p in text.split(",") if p.strip()]


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", help="Ray cluster to join, e.g. auto (default: $RAY_ADDRESS, else a local one)"
    )


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="output folder or URI (default: the spec's `output`)")
    _add_address(parser)
    parser.add_argument(
        "--overwrite", action="store_true", help="delete what sdbatch wrote at the output first"
    )
    parser.add_argument(
        "--yes", action="store_true", help="confirm a job of more than 100,000 images"
    )
    parser.add_argument(
        "--force", action="store_true", help="take the output over from the driver holding it"
    )


def _generate(args: argparse.Namespace) -> int:
    from sdbatch.generation import generate
    from sdbatch.spec import load_spec

    summary = generate(
        load_spec(args.spec),
        output=args.out,
        address=args.address,
        overwrite=args.overwrite,
        dry_run=args.dry_run,
        confirmed=args.yes,
        force=args.force,
        verify=args.verify,
    )
    return _incomplete(summary) if summary.failed else EXIT_OK


def _incomplete(summary: GenerateSummary) -> int:
    first = summary.failed[0]
    print(
        f"sdbatch: incomplete: {len(summary.failed)} work unit(s), {summary.failed_images} "
        f"images, failed after {first.attempts} attempts (first {first.unit_id}: "
        f"{first.error}); they are listed in {summary.output}/run.json; everything else is "
        "done; rerun the same command to retry only them",
        file=sys.stderr,
    )
    return EXIT_INCOMPLETE


def _prompts(args: argparse.Namespace) -> int:
    from sdbatch.prompts import convert_prompt_file

    output = args.output or str(Path(args.input).with_suffix(".parquet"))
    count = convert_prompt_file(args.input, output, args.column, args.id_column)
    log.info("wrote %d prompts to %s", count, output)
    return EXIT_OK


def _eval(args: argparse.Namespace) -> int:
    from sdbatch.evaluation.run import evaluate
    from sdbatch.evaluation.suite import load_suite

    suite = load_suite(args.suite) if args.suite else None
    print(evaluate(args.output, suite, address=args.address).metrics)
    return EXIT_OK


def _reference(args: argparse.Namespace) -> int:
    from sdbatch.evaluation.run import compute_reference
    from sdbatch.evaluation.suite import load_suite

    print(compute_reference(load_suite(args.suite), address=args.address))
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from sdbatch.api import demo_spec, run
    from sdbatch.evaluation.suite import load_suite
    from sdbatch.spec import load_spec

    summary = run(
        load_spec(args.spec or demo_spec()),
        suite=load_suite(args.suite) if args.suite else None,
        output=args.out,
        address=args.address,
        overwrite=args.overwrite,
        confirmed=args.yes,
        force=args.force,
    )
    if not summary.complete:
        return _incomplete(summary.generation)
    print(summary.report)
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    from sdbatch.integrity import verify

    report = verify(args.output, full=not args.quick)
    checked = "sizes" if args.quick else "sizes and sha256"
    print(f"{report.output}: {report.units} units, {report.images} images; {checked} checked")
    if report.holder is not None:
        print(f"held by {report.holder.describe()}")
    for problem in report.problems:
        print(f"redo {problem.describe()}")
    for file in report.unclaimed_files:
        print(f"remove {file}: no marker claims it")
    if report.clean:
        print("every committed unit matches its marker")
        return EXIT_OK
    print(
        f"a rerun of generate would redo {len(report.problems)} unit(s) and remove "
        f"{len(report.unclaimed_files)} unclaimed file(s)"
    )
    return EXIT_INCOMPLETE


def _pull(args: argparse.Namespace) -> int:
    from sdbatch.api import pull
    from sdbatch.evaluation.suite import load_suite
    from sdbatch.spec import load_spec

    suite = load_suite(args.suite) if args.suite else None
    for node, models in pull(load_spec(args.spec), suite=suite, address=args.address).items():
        for ref, where in models.items():
            print(f"{node}: {ref} -> {where}")
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    from sdbatch.progress import status

    now = status(args.output)
    print(now.to_json() if args.json else "\n".join(now.describe()))
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from sdbatch.reporting.write import write_report

    chosen = {} if args.prompts is None else {"prompts": args.prompts}
    print(write_report(args.outputs, prompt=args.prompt, **chosen))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
