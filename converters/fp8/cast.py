"""`convert fp8-bf16`: a DeepSeek-V3-style FP8 checkpoint to BF16 safetensors, sharded, resumable, exact.

Three steps, one module each: the plan (`fp8.plan`: every header read and validated, every scale
found through the index, nothing written), the shards (`fp8.shard`: each written under DST/.fp8-bf16/
and renamed into place only when complete), and this run: check and claim the destination, convert
this part's pending shards (in worker processes with --workers), then copy the other files and write
the index last: its presence means done. A shard whose output already holds exactly the expected
header and size is skipped, so a killed run resumes and ends byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from atomicio import atomic_copy, atomic_write_bytes
from converters.fp8.plan import FINISHED_FILE, STATE_DIR, CastOptions, CastPlan, ShardJob, plan_cast, shard_is_done
from converters.fp8.shard import convert_shard, remove_dead_temps
from converters.fp8.verify import verify_cast
from converters.jobs.partition import balance
from converters.jobs.pool import run_workers
from converters.jobs.progress import Progress
from converters.preflight import check_free_space, check_paths, check_readable, resolve_device
from toolkit.safetensors_index import INDEX_NAME


@dataclass
class CastSummary:
    shards_converted: int = 0
    shards_skipped: int = 0
    tensors: int = 0
    fp8_tensors: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    finalized: bool = False
    dst: str = ""
    verify: dict[str, int] | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def gb_per_s(self) -> float:
        return (self.bytes_in + self.bytes_out) / 1e9 / self.seconds if self.seconds else 0.0

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "gb_per_s": round(self.gb_per_s, 3)}




def finalize(plan: CastPlan) -> None:
    """Config, other files, then the index (written last: it marks the output as complete)."""
    for relative in plan.copies:
        atomic_copy(plan.src / relative, plan.dst / relative)
    if plan.config_out is not None:
        atomic_write_bytes(plan.dst / "config.json", plan.config_out.encode("utf-8"))
    if plan.has_index:
        weight_map = {job.output.name: shard.name for shard in plan.shards for job in shard.jobs}
        index = {
            "metadata": {**plan.index_metadata, "total_size": sum(job.output.nbytes for s in plan.shards for job in s.jobs)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        atomic_write_bytes(plan.dst / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())
    # what this output was made from, so a later run into the same dir never takes another source's
    # same-shaped output for its own
    atomic_write_bytes(plan.dst / FINISHED_FILE, (json.dumps(plan.identity, sort_keys=True) + "\n").encode())
    shutil.rmtree(plan.dst / STATE_DIR, ignore_errors=True)


def is_finished(plan: CastPlan) -> bool:
    """The destination holds a finished conversion of this source with these options."""
    try:
        return json.loads((plan.dst / FINISHED_FILE).read_text()) == json.loads(json.dumps(plan.identity))
    except (OSError, ValueError):
        return False


def run_cast(plan: CastPlan, progress_factory: Callable[[int], Callable[[int], None]] | None = None) -> CastSummary:
    """Convert this part's pending shards, then finalize if every shard of every part is there."""
    start = time.perf_counter()
    summary = CastSummary(dst=str(plan.dst))
    mine = plan.my_shards()
    if is_finished(plan) and all(shard_is_done(plan.dst, s) for s in plan.shards):
        summary.shards_skipped = len(mine)
        summary.finalized = True
        summary.seconds = time.perf_counter() - start
        return summary
    destination = plan.destination()
    check_paths(plan.src, plan.dst)
    destination.check()
    starting_over = destination.starts_over()
    pending = mine if starting_over else [shard for shard in mine if not shard_is_done(plan.dst, shard)]
    summary.shards_skipped = len(mine) - len(pending)
    copies = [plan.src / relative for relative in plan.copies]
    check_readable(copies)
    copy_bytes = sum(path.stat().st_size for path in copies) + len(plan.config_out or "")
    check_free_space(plan.dst, sum(shard.output_size for shard in pending) + copy_bytes, f"{len(pending)} shard(s) and {len(copies)} other file(s)")
    device = resolve_device(plan.options.device)
    with destination.claim():
        if starting_over:  # nothing of what is there may pass for this conversion's output
            for path in [plan.dst / INDEX_NAME, plan.dst / FINISHED_FILE] + [plan.dst / shard.name for shard in plan.shards]:
                path.unlink(missing_ok=True)
        remove_dead_temps(plan.dst / STATE_DIR)
        _convert_pending(plan, pending, device, progress_factory, summary)
        if all(shard_is_done(plan.dst, shard) for shard in plan.shards):
            finalize(plan)
            summary.finalized = True
    summary.seconds = time.perf_counter() - start
    return summary


def _convert_pending(plan: CastPlan, pending: list[ShardJob], device: torch.device, progress_factory, summary: CastSummary) -> None:
    progress = (progress_factory or (lambda total: lambda n: None))(sum(s.input_bytes for s in pending))
    if plan.options.workers > 1 and len(pending) > 1:
        _convert_in_workers(plan, pending, device, progress)
    else:
        # one shard's fsync and rename overlap the next shard's conversion
        with ThreadPoolExecutor(max_workers=1) as committer:
            landing: Future | None = None
            stages = []
            for shard in pending:
                busy, future = convert_shard(plan, shard, device, progress, committer)
                if landing is not None:
                    landing.result()
                landing = future
                stages.append(busy)
            if landing is not None:
                landing.result()
        for busy in stages:
            for stage, seconds in busy.items():
                summary.stage_seconds[stage] = round(summary.stage_seconds.get(stage, 0.0) + seconds, 3)
    for shard in pending:
        summary.shards_converted += 1
        summary.tensors += len(shard.jobs)
        summary.fp8_tensors += sum(job.scale is not None for job in shard.jobs)
        summary.bytes_in += shard.input_bytes
        summary.bytes_out += shard.output_size


def _convert_in_workers(plan: CastPlan, pending: list[ShardJob], device: torch.device, progress: Callable[[int], None]) -> None:
    """One process per GPU (or CPU slice), each given a balanced set of the pending shards."""
    workers = min(plan.options.workers, len(pending))
    if device.type == "cuda":
        devices = [f"cuda:{i % torch.cuda.device_count()}" for i in range(workers)]
    else:
        devices = ["cpu"] * workers
    threads = max(1, (os.cpu_count() or 1) // workers)
    groups = [[pending[i].name for i in group] for group in balance([s.output_size for s in pending], workers)]
    run_workers(
        _convert_shards,
        [(plan, names, dev, threads) for names, dev in zip(groups, devices, strict=True)],
        progress,
        [f"worker {i + 1} ({dev}, {len(names)} shard(s))" for i, (names, dev) in enumerate(zip(groups, devices, strict=True))],
    )


def _convert_shards(plan: CastPlan, shard_names: list[str], device: str, threads: int, report: Callable[[int], None]) -> None:
    """A worker process's share of the shards."""
    torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    by_name = {shard.name: shard for shard in plan.shards}
    for name in shard_names:
        convert_shard(plan, by_name[name], torch.device(device), report)


def cast_command(src: Path, dst: Path, options: CastOptions, verify: bool, as_json: bool, quiet: bool) -> int:
    """`convert fp8-bf16`: plan, run with progress, optionally verify, print; 0 done, 1 this part done."""
    plan = plan_cast(src, dst, options)
    with Progress("fp8->bf16", quiet=quiet or as_json) as progress:
        summary = run_cast(plan, progress.start)
    if verify and summary.finalized:
        summary.verify = verify_cast(plan)
    if as_json:
        print(json.dumps(summary.to_json(), indent=2))
    else:
        print(
            f"{summary.shards_converted} shard(s) converted, {summary.shards_skipped} already done; "
            f"{summary.tensors} tensors ({summary.fp8_tensors} FP8); {summary.bytes_in / 1e9:.2f} GB in, "
            f"{summary.bytes_out / 1e9:.2f} GB out in {summary.seconds:.1f} s ({summary.gb_per_s:.2f} GB/s)"
        )
        if summary.verify:
            print(f"verify: {summary.verify['blocks_checked']} FP8 blocks and {summary.verify['tensors_compared']} tensors match the source")
        print(f"output: {summary.dst}" + ("" if summary.finalized else " (waiting for the other --shard parts)"))
    return 0 if summary.finalized else 1
