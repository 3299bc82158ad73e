"""`convert fp8-bf16`: a DeepSeek-V3-style FP8 checkpoint to BF16 safetensors, sharded, resumable, exact.

Three steps, one module each: the plan (`fp8.plan`: every header read and validated, every scale
found through the index, nothing written), the shards (`fp8.shard`: each written under DST/.fp8-bf16/
and renamed into place only when complete), and this run: the job the lifecycle (`jobs.lifecycle`)
runs, whose items are the shards and whose finish copies the other files and writes the index. A
shard whose output already holds exactly the expected header and size is skipped, so a killed run
resumes and ends byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from atomicio import atomic_copy, atomic_write_bytes
from converters.fp8.plan import CastOptions, CastPlan, plan_cast, shard_is_done
from converters.fp8.shard import ShardWriter
from converters.fp8.verify import verify_cast
from converters.jobs.lifecycle import Job, ProgressFactory, run_job
from converters.jobs.progress import Progress
from converters.preflight import check_readable
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
    notes: list[str] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def gb_per_s(self) -> float:
        return (self.bytes_in + self.bytes_out) / 1e9 / self.seconds if self.seconds else 0.0

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "gb_per_s": round(self.gb_per_s, 3)}


@dataclass
class CastJob(Job):
    """The lifecycle's view of a cast: the shards are the items; the other files and the index finish it."""

    plan: CastPlan
    item_noun = "shard"

    @property
    def src(self) -> Path:
        return self.plan.src

    @property
    def dst(self) -> Path:
        return self.plan.dst

    @property
    def options(self) -> CastOptions:
        return self.plan.options

    @property
    def identity(self) -> dict[str, object]:
        return self.plan.identity

    @property
    def state_dir(self) -> Path:
        return self.plan.state_dir

    @property
    def finished_mark(self) -> Path:
        return self.plan.finished_mark

    def item_sizes(self) -> list[int]:
        return [shard.output_size for shard in self.plan.shards]

    def item_done(self, index: int) -> bool:
        return shard_is_done(self.plan.dst, self.plan.shards[index])

    def preflight(self, pending: list[int]) -> int:
        copies = [self.plan.src / relative for relative in self.plan.copies]
        check_readable(copies)
        return sum(path.stat().st_size for path in copies) + len(self.plan.config_out or "")

    def describe(self, pending: list[int]) -> str:
        return f"{len(pending)} shard(s) and {len(self.plan.copies)} other file(s)"

    def progress_total(self, pending: list[int]) -> int:
        return sum(self.plan.shards[index].input_bytes for index in pending)

    def open_writer(self, device: str) -> ShardWriter:
        return ShardWriter(self.plan, torch.device(device))

    def forget(self) -> None:
        for path in [self.plan.dst / INDEX_NAME] + [self.plan.dst / shard.name for shard in self.plan.shards]:
            path.unlink(missing_ok=True)

    def finalize(self) -> None:
        """Config, other files, then the index (the finished mark follows it)."""
        plan = self.plan
        for relative in plan.copies:
            atomic_copy(plan.src / relative, plan.dst / relative)
        if plan.config_out is not None:
            atomic_write_bytes(plan.dst / "config.json", plan.config_out.encode("utf-8"))
        if plan.has_index:
            outputs = [(output, shard.name) for shard in plan.shards for job in shard.jobs for output in job.outputs]
            index = {
                "metadata": {**plan.index_metadata, "total_size": sum(output.nbytes for output, _ in outputs)},
                "weight_map": dict(sorted((output.name, shard) for output, shard in outputs)),
            }
            atomic_write_bytes(plan.dst / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())


def run_cast(plan: CastPlan, progress_factory: ProgressFactory | None = None) -> CastSummary:
    """Convert this part's pending shards, then finalize if every shard of every part is there."""
    result = run_job(CastJob(plan), progress_factory)
    summary = CastSummary(dst=str(plan.dst), shards_skipped=result.skipped, finalized=result.finalized,
                          stage_seconds=result.stage_seconds)
    for shard in (plan.shards[index] for index in result.written):
        summary.shards_converted += 1
        summary.tensors += sum(job.output is not None for job in shard.jobs)  # a scale_inv alone is its weight's
        summary.fp8_tensors += sum(job.output is not None and (job.scale is not None or job.quantise) for job in shard.jobs)
        summary.bytes_in += shard.input_bytes
        summary.bytes_out += shard.output_size
    summary.seconds = result.seconds
    return summary


def cast_command(src: Path, dst: Path, options: CastOptions, verify: bool, as_json: bool, quiet: bool) -> int:
    """`convert fp8-bf16`: plan, run with progress, optionally verify, print; 0 done, 1 this part done."""
    return run_command(plan_cast(src, dst, options), verify, as_json, quiet)


def run_command(plan: CastPlan, verify: bool, as_json: bool, quiet: bool) -> int:
    """Run a planned fp8-bf16 or bf16-fp8 with progress, optionally verify, print; 0 done, 1 this part done."""
    with Progress(plan.tool.replace("-", "->"), quiet=quiet or as_json) as progress:
        summary = run_cast(plan, progress.start)
    if verify and summary.finalized:
        summary.verify = verify_cast(plan)
    summary.notes = plan.notes
    if as_json:
        print(json.dumps(summary.to_json(), indent=2))
    else:
        for note in plan.notes:
            print(note)
        print(
            f"{summary.shards_converted} shard(s) converted, {summary.shards_skipped} already done; "
            f"{summary.tensors} tensors ({summary.fp8_tensors} FP8); {summary.bytes_in / 1e9:.2f} GB in, "
            f"{summary.bytes_out / 1e9:.2f} GB out in {summary.seconds:.1f} s ({summary.gb_per_s:.2f} GB/s)"
        )
        if summary.verify:
            print(f"verify: {summary.verify['blocks_checked']} FP8 blocks and {summary.verify['tensors_compared']} tensors match the source")
        print(f"output: {summary.dst}" + ("" if summary.finalized else " (waiting for the other --shard parts)"))
    return 0 if summary.finalized else 1
