"""One error root for every converter, and the exit code each kind of failure maps to.

The CLI catches `ConvertError` once and prints its message: no traceback for an expected failure.
The root itself (and its exit code 2, refused) is `toolkit.errors.ConvertError`, on the ground floor,
because the safetensors reader there raises it too.
"""

from __future__ import annotations

import errno
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from toolkit.errors import ConvertError

EXIT_DONE = 0
EXIT_PART_DONE = 1  # this --shard part is done, other parts are still missing
EXIT_IO = 3
EXIT_FAILED = 4  # a worker process died, or an internal error (a bug: the traceback is printed)
EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NO_PERMISSION = {errno.EACCES, errno.EPERM, errno.EROFS}


class IOFailure(ConvertError):
    """Reading or writing a file failed (disk full, permission); re-running resumes."""

    exit_code = EXIT_IO

    @classmethod
    def from_os_error(cls, exc: OSError, path: object = None) -> IOFailure:
        where = exc.filename or path or "a file"
        if exc.errno in _NO_SPACE:
            advice = "the disk (or quota) is full; free space and re-run to resume"
        elif exc.errno in _NO_PERMISSION:
            advice = "fix the permissions and re-run to resume"
        else:
            advice = "re-run to resume"
        return cls(f"cannot write or read {where}: {exc.strerror or exc}; {advice}")


class WorkerDied(ConvertError):
    """A worker process ended without reporting (killed, e.g. by the out-of-memory killer)."""

    exit_code = EXIT_FAILED


class Interrupted(ConvertError):
    """SIGINT or SIGTERM arrived; the work done so far is kept."""

    def __init__(self, signum: int) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name}; finished files are kept, re-run the same command to resume",
                         EXIT_INTERRUPTED.get(signum, 128 + signum))
        self.signum = signum


def as_convert_error(exc: BaseException) -> ConvertError | None:
    """The ConvertError an exception stands for, or None for a bug (which keeps its traceback)."""
    if isinstance(exc, ConvertError):
        return exc
    if isinstance(exc, KeyboardInterrupt):
        return Interrupted(signal.SIGINT)
    if isinstance(exc, OSError) and exc.errno is not None:
        return IOFailure.from_os_error(exc)
    return None


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


@contextmanager
def signals_raise() -> Iterator[None]:
    """While inside, SIGTERM and SIGINT raise `Interrupted` in the main thread, so `finally` blocks
    (temp files removed, workers stopped and joined) run before the process exits."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {signum: signal.signal(signum, _raise_interrupted) for signum in EXIT_INTERRUPTED}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
