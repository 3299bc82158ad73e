"""One shard of `convert fp8-bf16` or `bf16-fp8`: read, (de)quantise and write overlapping, renamed into place when complete.

A reader thread, the (de)quantisation and the writer overlap; the output goes to a temp file under
DST/.fp8-bf16/ (or .bf16-fp8/) named with host and pid (so parts on other machines never remove each other's work)
and is renamed into place by its commit, which may run in another thread while the next shard starts.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from atomicio import AtomicFile
from converters.fp8.plan import CastError, CastPlan, ShardJob, TensorJob
from converters.hf.checkpoint import dequantise, quantise
from converters.hf.safetensors_io import read_tensor, tensor_bytes
from converters.jobs.claim import temp_path
from converters.jobs.lifecycle import ItemWriter, Report
from converters.jobs.throttle import Throttle
from kernels.fp8 import FP8FormatError
from toolkit.safetensors_index import TensorInfo


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
    """Read, (de)quantise and write one shard with the three stages overlapping; rename when complete.

    With a `committer`, the fsync and rename run there while the caller goes on with the next
    shard; the returned future says when (and whether) the shard landed. Also returns each stage's
    busy seconds: the stage whose time is close to the total is the bottleneck.
    """
    target = AtomicFile(plan.dst / shard.name, tmp_path=temp_path(plan.state_dir, shard.name))
    busy = {"read": 0.0, plan.kernel_stage: 0.0, "write": 0.0, "fsync": 0.0}
    errors: list[BaseException] = []
    batches: queue.Queue = queue.Queue()
    loaded: queue.Queue = queue.Queue(maxsize=2)
    converted: queue.Queue = queue.Queue(maxsize=2)

    pinned = device.type == "cuda"  # page-locked buffers make the copies to and from the GPU asynchronous

    def read(path: Path, info: TensorInfo) -> torch.Tensor:
        return read_tensor(path, info, torch.empty(info.nbytes, dtype=torch.uint8, pin_memory=True) if pinned else None)

    def load(batch: list[TensorJob]) -> list[tuple[TensorJob, torch.Tensor, torch.Tensor | None]]:
        start = time.perf_counter()
        items = []
        for job in batch:
            weight = read(job.source_path, job.source)
            side = job.scale or job.prior  # the source's scale_inv (dequantise) or the release's (quantise --like)
            side_path = job.scale_path or job.prior_path
            items.append((job, weight, read(side_path, side) if side is not None else None))
        busy["read"] += time.perf_counter() - start
        return items

    def convert_batch(items: list[tuple[TensorJob, torch.Tensor, torch.Tensor | None]]) -> list[tuple[TensorJob, list[torch.Tensor]]]:
        """Each job's output tensors: the source as read, dequantised, or quantised (codes and/or scale_inv)."""
        start = time.perf_counter()
        results: list[list[torch.Tensor]] = [[weight] for _, weight, _ in items]
        fp8 = [i for i, (job, _, _) in enumerate(items) if job.scale is not None]
        quant = [i for i, (job, _, _) in enumerate(items) if job.quantise]
        try:
            if fp8:
                outs = dequantise([items[i][1] for i in fp8], [items[i][2] for i in fp8], plan.block, device)
                for i, out in zip(fp8, outs, strict=True):
                    results[i] = [out]
            if quant:
                pairs = quantise([items[i][1] for i in quant], plan.block, device, [items[i][2] for i in quant],
                                 [items[i][0].source.name for i in quant])
                for i, pair in zip(quant, pairs, strict=True):
                    job = items[i][0]
                    results[i] = [tensor for tensor, output in zip(pair, (job.output, job.scale_output), strict=True) if output is not None]
        except FP8FormatError as exc:
            raise CastError(f"{shard.name}: {exc}") from exc
        busy[plan.kernel_stage] += time.perf_counter() - start
        return [(job, tensors) for (job, _, _), tensors in zip(items, results, strict=True)]

    threads = [
        threading.Thread(target=_produce, args=(load, batches, loaded, errors), daemon=True),
        threading.Thread(target=_produce, args=(convert_batch, loaded, converted, errors), daemon=True),
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
            for job, tensors in done:
                for output, tensor in zip(job.outputs, tensors, strict=True):
                    target.write_at(shard.offsets[output.name], tensor_bytes(tensor))
                    throttle.wrote(output.nbytes)
                progress(job.input_bytes)
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


class ShardWriter(ItemWriter):
    """The items of `convert fp8-bf16` and `bf16-fp8`: in one process, one shard's fsync and rename overlap the next shard's conversion.

    Worker processes (--workers) commit each shard before the next, as they always have: no extra thread
    to stop when a signal ends the worker.
    """

    def __init__(self, plan: CastPlan, device: torch.device) -> None:
        self.plan = plan
        self.device = device
        overlap = plan.options.workers <= 1
        self.committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{plan.tool}-fsync") if overlap else None
        self.landing: Future | None = None
        self.seconds: dict[str, float] = {}

    def write(self, index: int, progress: Report) -> None:
        busy, future = convert_shard(self.plan, self.plan.shards[index], self.device, progress, self.committer)
        if self.landing is not None:
            self.landing.result()
        self.landing = future
        for stage, seconds in busy.items():
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def close(self) -> None:
        self.abandon()
        if self.landing is not None:
            self.landing.result()

    def abandon(self) -> None:
        if self.committer is not None:
            self.committer.shutdown(wait=True)

