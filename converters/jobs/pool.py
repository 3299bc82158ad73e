"""Worker processes for one job: started together, watched, and stopped together.

Each worker gets its own pipe; the parent waits on the pipes and on the processes' sentinels, so a
worker that dies without a word (SIGKILL, the out-of-memory killer) is seen at once, never waited
for. The first failure stops the others. SIGTERM or SIGINT to the parent stops and joins every
worker before `Interrupted` goes on up, and a worker whose parent dies gets SIGTERM from the kernel.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

from converters.jobs.errors import EXIT_FAILED, WorkerDied, as_convert_error, signals_raise
from toolkit.errors import ConvertError

POLL_SECONDS = 1.0  # how often signal handlers get a chance while nothing happens
STOP_GRACE_SECONDS = 10.0  # after SIGTERM, how long a worker may take to remove its temp files
_PR_SET_PDEATHSIG = 1

Report = Callable[[int], None]


@dataclass
class _Worker:
    number: int
    label: str
    process: BaseProcess
    pipe: Connection
    finished: bool = False
    pipe_closed: bool = False


def run_workers(task: Callable[..., None], worker_args: list[tuple], progress: Report, labels: list[str] | None = None) -> None:
    """Run `task(*args, report)` in one spawned process per entry of `worker_args` and wait for all.

    `task` must be a module-level function; `report(n)` in a worker calls `progress(n)` here.
    A failure in any worker (an error it reports, or its death) stops the others and is raised
    here as a `ConvertError` that names the worker.
    """
    context = multiprocessing.get_context("spawn")
    labels = labels or [f"worker {i + 1}" for i in range(len(worker_args))]
    workers: list[_Worker] = []
    with signals_raise():
        try:
            for number, (args, label) in enumerate(zip(worker_args, labels, strict=True), start=1):
                receiver, sender = context.Pipe(duplex=False)
                process = context.Process(target=_worker_main, args=(task, args, sender, os.getpid()), name=label, daemon=True)
                process.start()
                sender.close()
                workers.append(_Worker(number, label, process, receiver))
            _watch(workers, progress)
        finally:
            _stop(workers)


def _watch(workers: list[_Worker], progress: Report) -> None:
    while not all(worker.finished for worker in workers):
        waitables = [w.pipe for w in workers if not w.pipe_closed] + [w.process.sentinel for w in workers if not w.finished]
        ready = set(wait(waitables, timeout=POLL_SECONDS))
        for worker in workers:
            if worker.pipe in ready or worker.process.sentinel in ready:
                _drain(worker, progress)
            if not worker.finished and worker.process.exitcode is not None:
                _drain(worker, progress)  # everything it sent before it ended is in the pipe now
                if not worker.finished:
                    raise WorkerDied(_death_message(worker, len(workers)))


def _drain(worker: _Worker, progress: Report) -> None:
    while not worker.pipe_closed and worker.pipe.poll():
        try:
            message = worker.pipe.recv()
        except EOFError:
            worker.pipe_closed = True
            return
        if message[0] == "progress":
            progress(message[1])
        elif message[0] == "done":
            worker.finished = True
        else:
            _, exit_code, text = message
            raise ConvertError(f"{worker.label} (pid {worker.process.pid}): {text}", exit_code)


def _death_message(worker: _Worker, count: int) -> str:
    code = worker.process.exitcode
    if code is not None and code < 0:
        cause = f"was killed by {signal.Signals(-code).name}"
        if -code == signal.SIGKILL:
            cause += " (the out-of-memory killer sends SIGKILL: see `dmesg`)"
    else:
        cause = f"exited with code {code} without finishing"
    return (f"{worker.label} of {count} (pid {worker.process.pid}) {cause}; the other workers were stopped, "
            "finished files are kept: re-run the same command to resume")


def _stop(workers: list[_Worker]) -> None:
    """Join finished workers; terminate, then kill, any still running. Signals wait until this is done."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        for worker in workers:
            if not worker.finished and worker.process.is_alive():
                worker.process.terminate()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for worker in workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
        for worker in workers:
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.pipe.close()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGTERM when the parent dies (Linux), so no worker outlives a killed parent."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # it died before the request was made
        os._exit(EXIT_FAILED)


def _worker_main(task: Callable[..., None], args: tuple, pipe: Connection, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    lock = threading.Lock()  # a task may report from several threads

    def report(count: int) -> None:
        with lock:
            pipe.send(("progress", count))

    with signals_raise():
        try:
            task(*args, report)
        except BaseException as exc:
            error = as_convert_error(exc)
            if error is None:
                text, code = "unexpected error:\n" + "".join(traceback.format_exception(exc)), EXIT_FAILED
            else:
                text, code = str(error), error.exit_code
            with lock:
                pipe.send(("error", code, text))
            raise SystemExit(1) from None
    with lock:
        pipe.send(("done",))
    pipe.close()
