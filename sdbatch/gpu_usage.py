"""How busy a worker kept its GPU: utilisation sampled in the background, counted only over the
time the worker was generating.

NVML's utilisation is the share of its last sample period (1/6 s to 1 s, by GPU) in which a
kernel ran. It is read through `torch.cuda.utilization`, which maps this process's device (after
CUDA_VISIBLE_DEVICES) to NVML's index and needs the `nvidia-ml-py` package (the `gpu` extra).

The window opens when the worker's first batch that is not warm-up begins (model loading and
compilation are not generation) and closes when its last batch ends: time between units, such as
the driver's round trip, counts against it, which is what the figure is for. Samples taken after
the last batch are held back until another batch ends, so the idle tail after a worker's last unit
does not count.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("sdbatch")
SAMPLE_SECONDS = 0.2


@dataclass
class BusyWindow:
    """Utilisation samples (time, busy %) summed over the marked generating window."""

    opened: float | None = None
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self._held: list[tuple[float, float]] = []  # since the last batch ended

    def sample(self, at: float, busy: float) -> None:
        """A reading of the period that ends `at`; it counts once a batch ends after it, inside
        the window."""
        self._held.append((at, busy))

    def batch(self, began: float, ended: float, warmup: bool) -> None:
        """A batch ran from `began` to `ended`; the first one not warm-up opens the window."""
        if self.opened is None and not warmup:
            self.opened = began
        if self.opened is not None:
            kept = [b for t, b in self._held if self.opened < t <= ended]
            self.total += sum(kept)
            self.count += len(kept)
        self._held = [(t, b) for t, b in self._held if t > ended]

    @property
    def busy_percent(self) -> float | None:
        return self.total / self.count if self.count else None


class GpuUsage:
    """Samples this process's GPU every SAMPLE_SECONDS in a daemon thread into a BusyWindow."""

    def __init__(self, read: Callable[[], float]):
        self.window = BusyWindow()
        self._read = read
        self._lock = threading.Lock()
        threading.Thread(target=self._sample, daemon=True, name="gpu-usage").start()

    @classmethod
    def of_this_process(cls) -> GpuUsage | None:
        """Sampling of the current CUDA device; None where NVML cannot be read (logged once)."""
        import torch

        try:
            torch.cuda.utilization()
        except Exception as e:  # no nvidia-ml-py, or a GPU NVML does not report
            log.warning("GPU utilisation is not recorded: %s (pip install nvidia-ml-py)", e)
            return None
        return cls(torch.cuda.utilization)

    def batch(self, began: float, ended: float, warmup: bool) -> None:
        with self._lock:
            self.window.batch(began, ended, warmup)

    def summary(self) -> dict[str, float | int | None]:
        """For run.json: mean busy % over the window, and the samples it is from."""
        with self._lock:
            busy = self.window.busy_percent
            return {
                "busy_percent": None if busy is None else round(busy, 1),
                "samples": self.window.count,
            }

    def _sample(self) -> None:
        while True:
            time.sleep(SAMPLE_SECONDS)
            busy = self._read()
            with self._lock:
                self.window.sample(time.perf_counter(), busy)
