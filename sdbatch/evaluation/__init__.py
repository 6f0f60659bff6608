"""The evaluation stage: a suite's metrics for every configuration of a generated output.

`run` orchestrates (plan, extract on Ray actors, gather, table, record); `inputs` resolves a
`suite` against the machine; `worker` extracts shards (`shards`, `images`, `clip`,
`extractors`); `reference` makes and caches reference statistics; `metric` says what a metric
is, `metrics/` holds one module per metric and `registry` lists them; `metric_math` is the pure
math; `gather` and `table` turn shards into configs.parquet; `record` is metrics.json.
"""
