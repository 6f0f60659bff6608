"""sdbatch: Stable Diffusion image sweeps at cluster scale, written as a resumable Parquet dataset,
and the metrics that judge them.

The Python API is the CLI's commands as functions, with the same names and flags (keyword-only):
`load_spec`, `load_suite`, `generate`, `evaluate`, `compute_reference`, `report`, `run`,
`status`, `verify`, `pull` and `convert_prompt_file`, and the types they take and return. A spec
or suite built in Python (`JobSpec(...)`, `Suite(...)`) is checked exactly like one read from YAML.

    >>> import sdbatch
    >>> spec = sdbatch.load_spec("jobs/demo.yaml")
    >>> spec.model, sdbatch.load_suite(spec.suite).name
    ('builtin:toy', 'demo')

Architecture: one idea per module, in layers, top to bottom. A module imports only modules listed
below it (tests/test_layout.py holds the code to this list).

    cli                             `sdbatch` commands: argument parsing and exit codes over the API
    api                             run(): generate -> evaluate -> report; pull(); the demo's spec
    progress                        status(): images, failures, pace, ETA, eval; from the output
    reporting.write                 report(): read evaluated runs, write index.html and report.md
    reporting.render                sections and figures -> self-contained HTML, and Markdown
    reporting.tasks                 image-conditioned runs: sources and results, strength, trade-off
    reporting.grids                 image galleries: configurations per prompt, worst images
    reporting.plots                 main effects; vs guidance, steps, adapter scale; trade-off
    reporting.summary               recommendation, models vs baseline, bests, effects, provenance
    reporting.runs                  an evaluated output: configs table, run and metrics records
    reporting.parts                 what a report is made of: sections, figures, galleries
    evaluation.run                  evaluate(): plan shards, extract (actors or here), gather, write
    evaluation.compare              paired differences, main effects, models vs the baseline
    evaluation.table                per-configuration table: every metric's aggregate, on actors
    evaluation.gather               shards -> per-image rows, merged statistics, features
    evaluation.worker               plain class: images -> CLIP, features, per-image scores
    evaluation.inputs               a suite resolved: CLIP pinned, extractor, reference, shard key
    evaluation.record               metrics.json, typed
    evaluation.suite                the evaluation suite: typed, validated, up front
    evaluation.registry             every metric, in column order; the report's trade-off
    evaluation.metrics.psnr_ssim    PSNR and SSIM to the source, where the task keeps it
    evaluation.metrics.directional  CLIP directional similarity: the edit against the captions'
    evaluation.metrics.cmmd         CMMD: kernel MMD on CLIP image embeddings
    evaluation.metrics.kid          KID and its settings
    evaluation.metrics.prdc         precision, recall, density, coverage (k-NN) and their k
    evaluation.metrics.fid          FID
    evaluation.metrics.attributes   shapes-world attribute accuracy, judged from pixels
    evaluation.metrics.clip_score   CLIP score
    evaluation.metric               what a metric declares; what it scores and aggregates
    evaluation.reference            reference images or .npz -> cached reference statistics
    evaluation.images               decoding a shard's images
    evaluation.sources              an output's source images, and what of them a result keeps
    evaluation.shards               units of evaluation work and their .npz files
    evaluation.extractors           feature extractors: inception, clip, dinov2, any nn.Module
    evaluation.clip                 CLIP in a worker: image and text embeddings
    evaluation.kid_math             pure math: KID's kernels, the reference's part computed once
    evaluation.metric_math          pure math: statistics that merge, FID, intervals
    generation                      generate(): spec -> committed image dataset, resumable
    integrity                       committed units checked against their markers; verify()
    worker                          plain class: a model kept loaded, adapters, tasks -> rows
    gpu_usage                       a worker's GPU busy % while it generates, sampled by NVML
    in_process                      units run in this process, as on one actor; no Ray
    distribute                      Ray: a session, one actor per GPU, units by model, retries
    worker_logs                     a worker's library warnings -> its log file; errors -> stderr
    output                          the output's layout: run.json, unit commits, markers
    lease                           one driver per output: the lease, its holder, takeover
    records                         run.json and unit markers, typed
    image_rows                      the image dataset's row and key columns
    prompts                         prompt files -> (prompt_id, prompt, negative_prompt)
    sweep                           configurations (model x adapter x grid x task), seeds, units
    sources                         source images, masks, depth maps: checked, sized; their file
    adapters                        LoRA reference -> pinned AdapterSource; its fit to a model
    speed                           runtime speed options on a loaded pipeline: compile, attention
    models                          model reference -> pinned ModelSource; pipeline loading
    spec                            the job spec: typed, validated, up front
    toy.build                       writes every builtin model's shipped files
    toy.tasks                       trains toy-inpaint and toy-depth (9- and 5-channel UNets)
    toy.lora                        trains the toy-purple adapter: a LoRA that teaches toy purple
    toy.train                       trains toy-clip and toy on the shapes world
    toy.components                  the builtin models' parts (byte tokenizer, scheduler, CLIP)
    toy.world                       the shapes world: scenes, rendering, masks, depth, the judge
    builtin                         builtin:NAME -> a model or adapter folder shipped in the package
    schedulers                      scheduler names -> diffusers classes (from_config)
    publish                         files written whole: a temporary name, then a move
    digests                         sha256 identities of files, folders and weights
    typed_data                      YAML/JSON data -> typed dataclasses, one-line field errors
    errors                          InputError (exit 2) and JobFailed (exit 1)
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Exported lazily: `import sdbatch` (and so `sdbatch --help`, and every Ray worker) does not pay
# for pandas, pyarrow and the stages it does not use.
_EXPORTS = {
    "load_spec": "sdbatch.spec",
    "JobSpec": "sdbatch.spec",
    "PromptSource": "sdbatch.spec",
    "Sweep": "sdbatch.spec",
    "Runtime": "sdbatch.spec",
    "load_suite": "sdbatch.evaluation.suite",
    "Suite": "sdbatch.evaluation.suite",
    "generate": "sdbatch.generation",
    "GenerateSummary": "sdbatch.generation",
    "evaluate": "sdbatch.evaluation.run",
    "compute_reference": "sdbatch.evaluation.run",
    "EvalSummary": "sdbatch.evaluation.run",
    "report": "sdbatch.reporting.write",
    "run": "sdbatch.api",
    "RunSummary": "sdbatch.api",
    "pull": "sdbatch.api",
    "convert_prompt_file": "sdbatch.prompts",
    "status": "sdbatch.progress",
    "Status": "sdbatch.progress",
    "verify": "sdbatch.integrity",
    "VerifyReport": "sdbatch.integrity",
    "InputError": "sdbatch.errors",
    "JobFailed": "sdbatch.errors",
}
_RENAMED = {"report": "write_report"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sdbatch' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
