"""An actor's GPU busy % counts the time it was generating: from its first batch that is not
warm-up to its last batch, gaps between units included, the idle tail after its last one not."""

from __future__ import annotations

import time

import pytest

from sdbatch.gpu_usage import SAMPLE_SECONDS, BusyWindow, GpuUsage


def readings(busy_until: list[tuple[float, float]], step: float = 0.1):
    """(time, busy %) every `step` s: busy % from the first (end time, value) pair not yet past."""
    t, out = 0.0, []
    for end, value in busy_until:
        while t < end - 1e-9:
            out.append((round(t, 6), value))
            t += step
    return out


def test_the_window_opens_after_warm_up_and_counts_gaps_but_not_the_tail():
    # load 0-1 s (idle), warm-up batch 1-2 s (busy), batches 2-3 s and 4-5 s with an idle
    # second between them (the driver's round trip), then idle to 8 s after the last batch.
    samples = readings([(1, 0), (2, 100), (3, 90), (4, 0), (5, 80), (8, 0)])
    window = BusyWindow()
    marks = [(1.0, 2.0, True), (2.0, 3.0, False), (4.0, 5.0, False)]
    for at, busy in samples:
        window.sample(at, busy)
        for began, ended, warmup in [m for m in marks if m[1] <= at + 1e-9]:
            window.batch(began, ended, warmup)
            marks.remove((began, ended, warmup))
    expected = [b for t, b in samples if 2.0 < t <= 5.0]  # a reading covers the time before it
    assert window.count == len(expected)
    assert window.busy_percent == pytest.approx(sum(expected) / len(expected))
    assert window.busy_percent == pytest.approx((9 * 90 + 10 * 0 + 10 * 80 + 1 * 0) / 30)


def test_nothing_counts_before_a_batch_that_is_not_warm_up():
    window = BusyWindow()
    window.sample(0.5, 100)
    window.batch(0.0, 1.0, warmup=True)
    assert window.busy_percent is None and window.count == 0


def test_the_sampler_thread_reads_the_device_while_batches_run():
    usage = GpuUsage(lambda: 40.0)
    began = time.perf_counter()
    time.sleep(SAMPLE_SECONDS * 4)
    usage.batch(began, time.perf_counter(), warmup=False)
    summary = usage.summary()
    assert summary["samples"] >= 1 and summary["busy_percent"] == 40.0
