"""The conversion lifecycle, run once here for every converter: a converter says what, this says when.

`run_job` runs the sequence: finished already? -> check the destination -> start over? -> this part's
pending items -> free space -> claim (lock) -> write the pending items, in this process or in worker
processes -> finalize and the finished mark, once every item of every part is there. A converter
subclasses `Job` with its items (and their output sizes), how to tell one is done, a writer that
writes one item, how to forget another conversion's outputs, and how to finish.

The finished mark (the job's identity as JSON) is written after everything else and removed first
when starting over, so its presence with a matching identity means: this exact conversion is done.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from atomicio import atomic_write_bytes
from converters.jobs.claim import Destination, remove_dead_temps
from converters.jobs.options import JobOptions
from converters.jobs.partition import balance
from converters.jobs.pool import run_workers
from converters.preflight import check_free_space, check_paths, resolve_device

Report = Callable[[int], None]


def is_finished_mark(name: str) -> bool:
    """Every converter's finished mark is `.TOOL-source.json` in its output: never copied into another output."""
    return name.startswith(".") and name.endswith("-source.json")

ProgressFactory = Callable[[int], Report]


class ItemWriter(ABC):
    """Writes a job's items one after another; opened once per process, so state (a committer thread,
    an open source) carries from item to item. `seconds` is busy time per stage, for the summary."""

    seconds: dict[str, float]

    @abstractmethod
    def write(self, index: int, progress: Report) -> None: ...

    @abstractmethod
    def close(self) -> None:
        """Everything written has landed; raises what failed in the background."""

    def __enter__(self) -> ItemWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()

    @abstractmethod
    def abandon(self) -> None:
        """Stop after a failure: background work is waited for, its errors are not raised over the first one."""


class Job(ABC):
    """What a converter gives `run_job`: its plan, or a wrapper of it. Must pickle: worker processes get a copy
    and open their own writer.

    Besides the methods below, a job has `src`, `dst` and `options` (fields or properties), and:
    `identity`: what must match for a re-run to resume or count as done (tool, source sizes and times, options);
    `state_dir`: inside dst, the claim, the locks and unfinished temp files, removed once finished;
    `finished_mark`: inside dst, the identity of the finished output, written last.
    """

    src: Path
    dst: Path
    options: JobOptions
    identity: dict[str, Any]
    state_dir: Path
    finished_mark: Path
    item_noun = "item"  # how messages name one item: "shard", "bin"

    def destination(self) -> Destination:
        """This part's claim on dst."""
        return self.options.destination(self.dst, self.state_dir, self.identity)

    @abstractmethod
    def item_sizes(self) -> list[int]:
        """Output bytes of every item of every part, in plan order (parts and workers are split by these)."""

    @abstractmethod
    def item_done(self, index: int) -> bool:
        """The item's output is complete on disk (a kill at any point never leaves one that looks so and is not)."""

    @abstractmethod
    def open_writer(self, device: str) -> ItemWriter: ...

    @abstractmethod
    def forget(self) -> None:
        """Starting over: remove what another conversion left under this job's output names."""

    @abstractmethod
    def finalize(self) -> None:
        """Everything written after the items (index, config, metadata); the finished mark comes after it."""

    def complete(self) -> bool:
        """The finished outputs are all there (asked only when the finished mark matches)."""
        return all(self.item_done(index) for index in range(len(self.item_sizes())))

    def preflight(self, pending: list[int]) -> int:
        """Checks before anything is written beyond the destination's; returns bytes needed besides the items."""
        return 0

    def describe(self, pending: list[int]) -> str:
        """What the free space is needed for."""
        return f"{len(pending)} {self.item_noun}(s)"

    def progress_total(self, pending: list[int]) -> int:
        """What progress counts to for these items (bytes read or written, as the writer reports)."""
        sizes = self.item_sizes()
        return sum(sizes[index] for index in pending)

    def my_items(self) -> list[int]:
        """This part's items under --shard I/N."""
        return balance(self.item_sizes(), self.options.shard_count)[self.options.shard_index]


@dataclass
class JobResult:
    written: list[int] = field(default_factory=list)  # the items this run wrote
    skipped: int = 0  # this part's items found done
    finalized: bool = False
    already_finished: bool = False  # nothing to do: the finished mark matched
    stage_seconds: dict[str, float] = field(default_factory=dict)  # one process only (no workers)
    seconds: float = 0.0


def is_finished(job: Job) -> bool:
    """The destination holds this exact conversion, finished."""
    try:
        recorded = json.loads(job.finished_mark.read_text())
    except (OSError, ValueError):
        return False
    # through JSON, so tuples and lists compare alike
    return recorded == json.loads(json.dumps(job.identity)) and job.complete()


def run_job(job: Job, progress_factory: ProgressFactory | None = None) -> JobResult:
    """Write this part's pending items, then finalize if every item of every part is there."""
    start = time.perf_counter()
    mine = job.my_items()
    if is_finished(job):
        return JobResult(skipped=len(mine), finalized=True, already_finished=True, seconds=time.perf_counter() - start)
    check_paths(job.src, job.dst)
    destination = job.destination()
    destination.check()
    starting_over = destination.starts_over()
    pending = mine if starting_over else [index for index in mine if not job.item_done(index)]
    sizes = job.item_sizes()
    others = job.preflight(pending)
    check_free_space(job.dst, sum(sizes[index] for index in pending) + others, job.describe(pending))
    device = str(resolve_device(job.options.device))
    result = JobResult(written=pending, skipped=len(mine) - len(pending))
    with destination.claim():
        if starting_over:  # nothing already there may pass for this conversion's output
            job.finished_mark.unlink(missing_ok=True)
            job.forget()
        remove_dead_temps(job.state_dir)
        progress = (progress_factory or (lambda total: lambda n: None))(job.progress_total(pending))
        result.stage_seconds = _write(job, pending, device, progress)
        if all(job.item_done(index) for index in range(len(sizes))):
            job.finalize()
            atomic_write_bytes(job.finished_mark, (json.dumps(job.identity, sort_keys=True) + "\n").encode())
            shutil.rmtree(job.state_dir, ignore_errors=True)
            result.finalized = True
    result.seconds = time.perf_counter() - start
    return result


def _write(job: Job, pending: list[int], device: str, progress: Report) -> dict[str, float]:
    """The pending items in this process, or spread by size over --workers processes (one per GPU)."""
    workers = min(job.options.workers, len(pending))
    if workers <= 1:
        with job.open_writer(device) as writer:
            for index in pending:
                writer.write(index, progress)
        return {stage: round(seconds, 3) for stage, seconds in writer.seconds.items()}
    sizes = job.item_sizes()
    groups = [[pending[i] for i in group] for group in balance([sizes[index] for index in pending], workers)]
    if device.startswith("cuda"):
        devices = [f"cuda:{w % torch.cuda.device_count()}" for w in range(workers)]
    else:
        devices = [device] * workers
    threads = max(1, (os.cpu_count() or 1) // workers)
    run_workers(
        _write_share,
        [(job, items, worker_device, threads) for items, worker_device in zip(groups, devices, strict=True)],
        progress,
        [f"worker {w + 1} ({worker_device}, {len(items)} {job.item_noun}(s))"
         for w, (items, worker_device) in enumerate(zip(groups, devices, strict=True))],
    )
    return {}


def _write_share(job: Job, items: list[int], device: str, threads: int, report: Report) -> None:
    """A worker process's share of the items."""
    torch.set_num_threads(threads)  # the workers share the cores instead of each taking all of them
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    with job.open_writer(device) as writer:
        for index in items:
            writer.write(index, report)
