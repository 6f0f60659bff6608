"""One module per metric, each declaring its `Metric`; `sdbatch.evaluation.registry` lists them."""
