"""One shard of `convert fp8-bf16`: read, dequantise and write overlapping, renamed into place when complete.

A reader thread, the dequantisation and the writer overlap; the output goes to a temp file under
DST/.fp8-bf16/ named with host and pid (so parts on other machines never remove each other's work)
and is renamed into place by its commit, which may run in another thread while the next shard starts.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from atomicio import AtomicFile
from converters.fp8.plan import STATE_DIR, CastError, CastPlan, ShardJob, TensorJob
from converters.hf.safetensors_io import read_tensor, tensor_bytes
from converters.jobs.throttle import Throttle
from kernels.fp8 import FP8FormatError, dequant_fp8_blocks_batched
from toolkit.safetensors_index import TensorInfo


def remove_dead_temps(state_dir: Path) -> None:
    for stale in state_dir.glob("*.tmp"):
        if _tmp_owner_dead(stale):
            stale.unlink(missing_ok=True)


def _tmp_name(shard: str) -> str:
    """Temp names carry host and pid, so parts on other machines never delete each other's work."""
    return f"{shard}~{socket.gethostname()}~{os.getpid()}.tmp"


def _tmp_owner_dead(path: Path) -> bool:
    """A shard temp file of this host whose process is gone; anything else is left alone."""
    try:
        _, host, pid = path.name[: -len(".tmp")].split("~")
        if host != socket.gethostname():
            return False
        os.kill(int(pid), 0)
    except ValueError:
        return False
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _batches(shard: ShardJob, limit: int) -> Iterator[list[TensorJob]]:
    batch: list[TensorJob] = []
    size = 0
    for job in shard.jobs:
        if batch and size + job.input_bytes > limit:
            yield batch
            batch, size = [], 0
        batch.append(job)
        size += job.input_bytes
    if batch:
        yield batch


def _produce(stage: Callable[[object], object], inbox: queue.Queue, outbox: queue.Queue, errors: list[BaseException]) -> None:
    """Run `stage` over items until the None sentinel; forward the sentinel; record the first error."""
    try:
        while (item := inbox.get()) is not None:
            if errors:
                continue
            outbox.put(stage(item))
    except BaseException as exc:  # handed to the main thread, which re-raises it
        errors.append(exc)
    finally:
        outbox.put(None)


def convert_shard(
    plan: CastPlan,
    shard: ShardJob,
    device: torch.device,
    progress: Callable[[int], None],
    committer: ThreadPoolExecutor | None = None,
) -> tuple[dict[str, float], Future | None]:
    """Read, dequantise and write one shard with the three stages overlapping; rename when complete.

    With a `committer`, the fsync and rename run there while the caller goes on with the next
    shard; the returned future says when (and whether) the shard landed. Also returns each stage's
    busy seconds: the stage whose time is close to the total is the bottleneck.
    """
    target = AtomicFile(plan.dst / shard.name, tmp_path=plan.dst / STATE_DIR / _tmp_name(shard.name))
    busy = {"read": 0.0, "dequant": 0.0, "write": 0.0, "fsync": 0.0}
    errors: list[BaseException] = []
    batches: queue.Queue = queue.Queue()
    loaded: queue.Queue = queue.Queue(maxsize=2)
    converted: queue.Queue = queue.Queue(maxsize=2)

    pinned = device.type == "cuda"  # page-locked buffers make the copies to and from the GPU asynchronous

    def read(path: Path, info: TensorInfo) -> torch.Tensor:
        return read_tensor(path, info, torch.empty(info.nbytes, dtype=torch.uint8, pin_memory=True) if pinned else None)

    def load(batch: list[TensorJob]) -> list[tuple[TensorJob, torch.Tensor, torch.Tensor | None]]:
        start = time.perf_counter()
        items = [
            (job, read(job.source_path, job.source), read(job.scale_path, job.scale) if job.scale else None)
            for job in batch
        ]
        busy["read"] += time.perf_counter() - start
        return items

    def dequantise(items: list[tuple[TensorJob, torch.Tensor, torch.Tensor | None]]) -> list[tuple[TensorJob, torch.Tensor]]:
        start = time.perf_counter()
        fp8 = [(job, weight, scale) for job, weight, scale in items if scale is not None]
        results = {}
        if fp8:
            try:
                outs = dequant_fp8_blocks_batched(
                    [weight.to(device, non_blocking=True) for _, weight, _ in fp8],
                    [scale.to(device, non_blocking=True) for _, _, scale in fp8],
                    plan.block,
                )
            except FP8FormatError as exc:
                raise CastError(f"{shard.name}: {exc}") from exc
            if pinned:
                host = [torch.empty(out.shape, dtype=out.dtype, pin_memory=True) for out in outs]
                for target, out in zip(host, outs, strict=True):
                    target.copy_(out, non_blocking=True)
                torch.cuda.current_stream(device).synchronize()
                outs = host
            results = {job.output.name: out.cpu() for (job, _, _), out in zip(fp8, outs, strict=True)}
        busy["dequant"] += time.perf_counter() - start
        return [(job, results.get(job.output.name, weight)) for job, weight, _ in items]

    threads = [
        threading.Thread(target=_produce, args=(load, batches, loaded, errors), daemon=True),
        threading.Thread(target=_produce, args=(dequantise, loaded, converted, errors), daemon=True),
    ]
    try:
        target.write(shard.header)
        for thread in threads:
            thread.start()
        for batch in _batches(shard, plan.options.batch_bytes):
            batches.put(batch)
        batches.put(None)
        throttle = Throttle(plan.options.write_limit)
        while (done := converted.get()) is not None:
            if errors:
                continue
            start = time.perf_counter()
            for job, tensor in done:
                target.write(tensor_bytes(tensor))
                progress(job.input_bytes)
                throttle.wrote(job.output.nbytes)
            busy["write"] += time.perf_counter() - start
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        target.close()
    except BaseException:
        target.discard()
        raise
    if committer is None:
        _commit(target, shard, busy)
        return busy, None
    return busy, committer.submit(_commit, target, shard, busy)


def _commit(target: AtomicFile, shard: ShardJob, busy: dict[str, float]) -> None:
    """fsync the finished temp file, check its size, and rename it into place."""
    start = time.perf_counter()
    target.commit(expected_size=shard.output_size)
    busy["fsync"] += time.perf_counter() - start


