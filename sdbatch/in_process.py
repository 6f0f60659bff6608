"""Work units run in this process, without Ray: what `distribute.run_units` does with one actor,
for a machine where that actor would only add a Ray instance and a second process importing torch
(evaluation with no cluster and no GPU). Same worker protocol, same result, same retries."""

from __future__ import annotations

import logging
from typing import Any

from sdbatch.distribute import Failure, RunResult, progress_bar
from sdbatch.errors import JobFailed, described, stop_if_requested

log = logging.getLogger("sdbatch")


def run_units_here(
    worker: type, setup: Any, units: list[Any], progress: tuple[int, int, str], retries: int
) -> RunResult:
    """Run every unit, in order, on one `worker(setup)` made in this process.

    A unit that raises is retried at once, `retries` times, then listed in `RunResult.failed`;
    the others go on. KeyboardInterrupt and a requested stop end the run between batches.

    Raises:
        JobFailed: the worker could not load its models, or a unit raised JobFailed (no unit's
            fault: retrying would not help).
    """
    try:
        loaded = worker(setup)
    except Exception as e:
        raise JobFailed(f"the worker failed to load: {described(e)}") from e
    result = RunResult([], 0.0)
    bar = progress_bar(*progress)
    try:
        for unit in units:
            for attempt in range(1, retries + 2):
                counted = 0
                try:
                    for item in loaded.run(unit):
                        stop_if_requested()
                        if isinstance(item, int):  # a batch; the last item is the unit's result
                            bar.update(item)
                            counted += item
                        else:
                            result.results[unit.unit_id] = item
                    break
                except JobFailed:
                    raise
                except Exception as e:
                    bar.update(-counted)
                    error = described(e)
                    if attempt <= retries:
                        log.warning(
                            "unit %s failed (attempt %d of %d), will retry: %s",
                            unit.unit_id, attempt, retries + 1, error,
                        )  # fmt: skip
                    else:
                        log.error(
                            "unit %s failed %d times, giving up: %s", unit.unit_id, attempt, error
                        )
                        result.failed[unit.unit_id] = Failure(unit, attempt, error)
        result.workers.append(loaded.describe())
    finally:
        result.seconds = bar.format_dict["elapsed"]
        bar.close()
    return result
