"""A worker process's library warnings: to a log file of its own, only errors to stderr.

Ray forwards a worker's stderr to the driver's, once per batch for a warning the libraries repeat
per call (diffusers' prompt truncation, up to 20,000 characters a line), burying the progress bar.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
from pathlib import Path

LIBRARIES = ("diffusers", "transformers")


def quiet_libraries(log_dir: str, libraries: tuple[str, ...] = LIBRARIES) -> Path:
    """Send this process's library warnings, Python's warnings among them, to
    LOG_DIR/worker-HOST-PID.log (made at the first one) and only their errors to stderr; returns
    the file's path. For a worker process: it changes logging for the whole process.

    Args:
        libraries: those of LIBRARIES the worker uses; each is imported here, and importing
            diffusers only to quiet it would slow a feature worker's start.
    """
    for library in libraries:
        # Both give their root logger a stderr handler of their own.
        importlib.import_module(f"{library}.utils.logging").disable_default_handler()
    if "transformers" in libraries:
        import transformers.utils.logging

        transformers.utils.logging.set_verbosity_warning()  # worker.ACTOR_ENV only quiets import
    logging.captureWarnings(True)
    path = Path(log_dir) / f"worker-{socket.gethostname()}-{os.getpid()}.log"
    to_file = _LogFile(path, delay=True)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    errors = logging.StreamHandler()
    errors.setLevel(logging.ERROR)
    for name in (*libraries, "py.warnings"):
        logger = logging.getLogger(name)
        logger.handlers = [to_file, errors]
        logger.propagate = False
    return path


class _LogFile(logging.FileHandler):
    """A log file whose folder is made with the file: a quiet worker leaves nothing behind."""

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()
