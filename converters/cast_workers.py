"""`--workers N` for convert fp8-bf16: shard files spread over processes, one per GPU or CPU slice."""

from __future__ import annotations

import multiprocessing
import os
import queue
from collections.abc import Callable

import torch

_DONE = "done"


def _worker(plan, shard_names: list[str], device: str, threads: int, events) -> None:
    from converters.fp8_bf16 import convert_shard

    torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    by_name = {shard.name: shard for shard in plan.shards}
    try:
        for name in shard_names:
            convert_shard(plan, by_name[name], torch.device(device), lambda n: events.put(("bytes", n)))
    except BaseException as exc:  # reported to the parent, which raises it with the shard's message
        events.put(("error", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from exc
    events.put((_DONE, None))


def convert_in_workers(plan, pending, device: torch.device, progress: Callable[[int], None]) -> None:
    """Give each worker a balanced set of shards (largest first); stream their progress to ours."""
    from converters.fp8_bf16 import CastError

    workers = min(plan.options.workers, len(pending))
    if device.type == "cuda":
        devices = [f"cuda:{i % torch.cuda.device_count()}" for i in range(workers)]
    else:
        devices = ["cpu"] * workers
    threads = max(1, (os.cpu_count() or 1) // workers)
    assignment: list[list[str]] = [[] for _ in range(workers)]
    loads = [0] * workers
    for shard in sorted(pending, key=lambda s: (-s.output_size, s.name)):
        slot = min(range(workers), key=lambda w: (loads[w], w))
        assignment[slot].append(shard.name)
        loads[slot] += shard.output_size
    context = multiprocessing.get_context("spawn")
    events = context.Queue()
    processes = [
        context.Process(target=_worker, args=(plan, names, dev, threads, events), daemon=True)
        for names, dev in zip(assignment, devices, strict=True)
    ]
    for process in processes:
        process.start()
    finished, errors = 0, []
    try:
        while finished < len(processes):
            try:
                kind, value = events.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in processes if p.exitcode not in (None, 0)]
                if dead and not errors:
                    errors.append(f"worker pid {dead[0].pid} died with exit code {dead[0].exitcode}")
                if errors and all(p.exitcode is not None for p in processes):
                    break
                continue
            if kind == "bytes":
                progress(value)
            elif kind == "error":
                errors.append(value)
                finished += 1
            else:
                finished += 1
    finally:
        if errors:
            for process in processes:
                process.terminate()
        for process in processes:
            process.join()
    if errors:
        raise CastError("; ".join(errors))
