"""sdbatch: Stable Diffusion image sweeps at cluster scale, written as a resumable Parquet dataset,
and the metrics that judge them.

Architecture (who calls whom; one module per stage):

    cli ─┬─ generate ─┬─ spec        YAML -> typed, validated JobSpec and Suite, up front
         │            ├─ prompts     Parquet prompt set -> (prompt_id, prompt, negative_prompt)
         │            ├─ sweep       configurations, per-image seeds, work units left to do
         │            ├─ pipeline    model ref -> pinned ModelSource; from_pretrained in workers
         │            │    └─ builtin, schedulers
         │            ├─ dataset     output layout: run.json, atomic unit commits, done markers
         │            └─ distribute  Ray actors (one per GPU) pulling units, retries, progress bar
         │                 └─ worker   plain class: loaded pipeline -> PNG rows -> dataset commit
         ├─ eval ─────┬─ reference   real images or .npz -> cached reference statistics
                      ├─ distribute  the same actors and bar, running features.FeatureWorker
                      │    └─ features  plain class: images -> CLIP scores, features, shard stats
                      └─ metrics     pure math: merged statistics -> FID, KID, CLIP score, intervals
         └─ report ───── metrics + images -> one self-contained HTML page and Markdown
    world: rendered shapes, the demo suite's reference images
"""

__version__ = "0.1.0"
