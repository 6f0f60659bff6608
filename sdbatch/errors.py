"""The two kinds of failure a user sees: bad input (exit 2), and a job that broke (exit 1); and the
stop a signal asks for."""

import threading

# An error quotes values from files a user (or anyone) wrote; the message must stay one short
# line whatever they hold. Values are cut where they are quoted (typed_data.shown); this is the
# last guard, for a path or a name quoted whole.
MAX_MESSAGE = 280


class InputError(Exception):
    """Bad input: a spec field, a prompt file, a model reference or an argument.

    The message is one line that names the field and says what is allowed; it is raised before any
    model or Ray worker starts, so nothing has been written. A longer message keeps its start (the
    field) and its end (what is allowed) around a cut.
    """

    def __init__(self, message: str) -> None:
        text = " ".join(line.strip() for line in str(message).splitlines())
        if len(text) > MAX_MESSAGE:
            cut = " [...] "
            head = MAX_MESSAGE * 2 // 3
            text = text[:head] + cut + text[len(text) - (MAX_MESSAGE - head - len(cut)) :]
        super().__init__(text)


class JobFailed(Exception):
    """Generation started and could not finish; committed work units are kept for a rerun.

    A worker raises it (or a subclass) for what is no unit's fault, so that the job stops at once
    instead of retrying and bisecting its units.
    """


class StoreFailed(JobFailed):
    """The output store refused a write: no space, over quota, no permission, unreachable."""


class LeaseLost(JobFailed):
    """Another driver took the output over; this run must not write to it any more."""


# Set by the CLI's SIGINT and SIGTERM handlers, which also raise KeyboardInterrupt. Python drops an
# exception raised while a finalizer runs (Ray frees object references in Cython deallocators), and
# a run once went on to the end after its SIGINT: long loops check this as well.
STOP_REQUESTED = threading.Event()


def stop_if_requested() -> None:
    """Raise KeyboardInterrupt if a signal asked the run to stop."""
    if STOP_REQUESTED.is_set():
        raise KeyboardInterrupt


def first_line(error: BaseException) -> str:
    """An exception's message cut to one line (or its type's name), to quote inside an error."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def described(error: BaseException) -> str:
    """An exception as one line: its type's name and the first line of its message."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
