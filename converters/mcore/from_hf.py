"""`convert hf-mcore`: a HF DeepSeek-V3-class checkpoint (BF16 or FP8) -> Megatron-Core torch_dist.

One process, no GPU needed, bounded memory: tensors are planned at their global shapes from the
headers alone, then read, dequantised (FP8) and written chunk by chunk into bins of `.distcp` files.
The result loads at any TP/PP/EP with megatron-core's `dist_checkpointing.load`. With `align_tp`/`align_etp`
the chunks are cut at the slices a training plan's ranks ask for (converters/mcore/tp_layout.py), so that each rank
reads only its own bytes at load; without them the output is what it always was.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata

from converters.hf.buffers import BufferPool
from converters.hf.checkpoint import HFCheckpoint, SourceError, beyond_declared_layers
from converters.jobs.lifecycle import ItemWriter, Job, ProgressFactory, Report, run_job
from converters.jobs.options import JobOptions
from converters.jobs.progress import Progress
from converters.mcore.config import ConfigError, mcore_config_kwargs
from converters.mcore.dist_ckpt import (
    BIN_BYTES,
    DONE_FILE,
    PREFETCH_BYTES,
    RELEASE_DIR,
    STATE_DIR,
    BinWriter,
    Piece,
    bin_done,
    finish_checkpoint,
    forget_bins,
    make_bins,
    plan_pieces,
)
from converters.mcore.mapping import Chunk, MappingError, check_shapes, plan_mapping
from converters.mcore.tp_layout import BoxReader, LayoutError, align_mapping
from converters.preflight import check_paths, resolve_device
from toolkit.errors import ConvertError


@dataclass(frozen=True)
class McoreOptions(JobOptions):
    spec: str = "te"
    drop_mtp: bool = False
    bin_bytes: int = BIN_BYTES
    readers: int | None = None  # threads making chunks ahead of the writer, per worker; None: default_readers
    align_tp: int | None = None  # chunks cut at the TP slices a rank asks for (None: every tensor at its global chunks)
    align_etp: int | None = None  # the same for routed experts (None with align_tp: ETP = TP, Megatron's default)

    @property
    def alignment(self) -> tuple[int, int] | None:
        """(TP, ETP) the chunks are cut for, or None for the global layout."""
        if self.align_tp is None and self.align_etp is None:
            return None
        tp = self.align_tp or 1
        return tp, self.align_etp or tp


@dataclass
class McorePlan(Job):
    """The lifecycle's items are the bins; `.metadata` and the files megatron-core reads finish it."""

    src: Path
    dst: Path
    options: McoreOptions
    bins: list[list[Piece]]
    metadata: Metadata
    identity: dict[str, Any]
    tensors: int
    objects: int
    notes: list[str] = field(default_factory=list)
    item_noun = "bin"

    @property
    def release(self) -> Path:
        return self.dst / RELEASE_DIR

    @property
    def state_dir(self) -> Path:
        return self.release / STATE_DIR

    @property
    def finished_mark(self) -> Path:
        return self.release / DONE_FILE

    def item_sizes(self) -> list[int]:
        return [sum(piece.nbytes for piece in pieces) for pieces in self.bins]

    def item_done(self, index: int) -> bool:
        return bin_done(self.release, index)

    def complete(self) -> bool:
        return (self.release / ".metadata").is_file()  # the bins' done-marks go with the state dir

    def open_writer(self, device: str) -> BinItems:
        return BinItems(self, device)

    def readers(self, device: str) -> int:
        """Reader threads per process on `device` (--readers, else the measured default)."""
        return self.options.readers or default_readers(device, self.options.workers)

    def forget(self) -> None:
        forget_bins(self.release, len(self.bins))

    def finalize(self) -> None:
        finish_checkpoint(self.dst, self.metadata, len(self.bins), json.dumps(self.identity, sort_keys=True))


class BinItems(ItemWriter):
    """One BinWriter and one chunk reader for all the bins this process writes."""

    def __init__(self, plan: McorePlan, device: str) -> None:
        self.plan = plan
        self.writer, self.make_chunk = _open(plan.src, plan.release, device, plan.readers(device), plan.options.write_limit)

    @property
    def seconds(self) -> dict[str, float]:
        return self.writer.seconds

    def write(self, index: int, progress: Report) -> None:
        try:
            self.writer.write(index, self.plan.bins[index], self.make_chunk, progress)
        except ConvertError:
            raise
        except ValueError as exc:  # a tensor that does not fit its chunk: the message names it
            raise ConvertError(str(exc)) from exc

    def close(self) -> None:
        self.writer.close()

    def abandon(self) -> None:
        self.writer.abandon()


@dataclass
class McoreSummary:
    dst: str
    dist_checkpointing_path: str
    bins_written: int = 0
    bins_skipped: int = 0
    tensors: int = 0
    objects: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    finalized: bool = False
    notes: list[str] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # one process only (no --workers)
    readers: int = 0  # reader threads per process
    layout: str = "global"  # or "aligned TP<n> ETP<m>"

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def plan_conversion(src: Path, dst: Path, options: McoreOptions) -> McorePlan:
    """Everything decided from config.json and the headers; raises ConvertError listing problems."""
    src, dst = Path(src), Path(dst)
    check_paths(src, dst)
    try:
        source = HFCheckpoint(src)
        mcore_config_kwargs(source.config)
        shapes = {name: source.shape(name) for name in source.names()}
        problems = check_shapes(source.config, shapes)
        if problems:
            raise ConvertError(f"{src}: shapes disagree with config.json:\n  " + "\n  ".join(problems))
        mapping = plan_mapping(source.config, shapes, options.spec, options.drop_mtp)
        if options.alignment is not None:
            mapping = align_mapping(mapping, *options.alignment)
    except (SourceError, ConfigError, MappingError, LayoutError, KeyError) as exc:
        raise ConvertError(f"{src}: {exc}") from exc
    skipped, notes = beyond_declared_layers(shapes, source.config, options.drop_mtp)
    unmapped = sorted(name for name in shapes if name not in mapping.used_sources and name not in skipped)
    if unmapped:
        shown = ", ".join(unmapped[:8]) + (f" and {len(unmapped) - 8} more" if len(unmapped) > 8 else "")
        raise ConvertError(
            f"{src}: {len(unmapped)} tensor(s) of a {source.config.get('model_type')} checkpoint have no Megatron-Core name "
            f"(no rule of the mapping covers them; nothing written): {shown}"
        )
    pieces, metadata = plan_pieces(mapping, source.output_dtype)
    facts = {
        "tool": "convert hf-mcore",
        "source": str(src.resolve()),
        "spec": options.spec,
        "drop_mtp": options.drop_mtp,
        "bin_bytes": options.bin_bytes,
        "shards": {n: [h.file_size, (src / n).stat().st_mtime_ns] for n, h in source.headers.items()},
    }
    if options.alignment is not None:  # only then: the global layout's identity (and files) stay as they were
        facts["align_tp_etp"] = list(options.alignment)
    return McorePlan(src, dst, options, make_bins(pieces, options.bin_bytes), metadata, facts, len(mapping.tensors),
                     len(mapping.objects), notes)


def _chunk_reader(source: HFCheckpoint, buffers: BufferPool | None = None) -> Callable[[Chunk], torch.Tensor]:
    return BoxReader(source, buffers)


def default_readers(device: str, workers: int = 1) -> int:
    """1 when a GPU dequantises (more were slower on an H100 node); else a quarter of this process's share
    of the CPU cores, at most 4 (4 readers took a 16-core node from 2.4x to 1.0x the I/O floor)."""
    if torch.device(device).type == "cuda":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores // (4 * workers)))


def _open(src: Path, release: Path, device: str, readers: int, rate: float | None) -> tuple[BinWriter, Callable[[Chunk], torch.Tensor]]:
    """A bin writer and a chunk reader sharing one pool of buffers (pinned when dequantising on a GPU)."""
    source = HFCheckpoint(src, device)
    buffers = BufferPool(PREFETCH_BYTES, pin_memory=torch.device(device).type == "cuda")
    return BinWriter(release, readers, buffers.give, rate), _chunk_reader(source, buffers)


def run_conversion(plan: McorePlan, progress_factory: ProgressFactory | None = None) -> McoreSummary:
    """Write this part's pending bins (resuming), then `.metadata` and the small files once all are there."""
    summary = McoreSummary(dst=str(plan.dst), dist_checkpointing_path=str(plan.release), tensors=plan.tensors, objects=plan.objects,
                           notes=list(plan.notes))
    if plan.options.alignment is not None:
        summary.layout = "aligned TP{} ETP{}".format(*plan.options.alignment)
    result = run_job(plan, progress_factory)
    summary.bins_skipped, summary.finalized = result.skipped, result.finalized
    if result.already_finished:
        summary.notes.append("already complete: nothing to do")
        return summary
    sizes = plan.item_sizes()
    summary.bins_written = len(result.written)
    summary.bytes_out = sum(sizes[index] for index in result.written)
    summary.stage_seconds = result.stage_seconds
    summary.readers = plan.readers(str(resolve_device(plan.options.device)))
    summary.seconds = round(result.seconds, 3)
    return summary


def mcore_command(src: Path, dst: Path, options: McoreOptions, as_json: bool, quiet: bool) -> int:
    """`convert hf-mcore`: plan, write with progress, print; 0 done, 1 this --shard part done."""
    plan = plan_conversion(src, dst, options)
    with Progress("hf->mcore", quiet=quiet or as_json) as progress:
        summary = run_conversion(plan, progress.start)
    if as_json:
        print(json.dumps(summary.to_json(), indent=2))
    else:
        for note in summary.notes:
            print(note)
        print(
            f"{summary.bins_written} bin(s) written, {summary.bins_skipped} already there; {summary.tensors} tensors, "
            f"{summary.objects} extra-state objects, {summary.bytes_out / 1e9:.2f} GB in {summary.seconds:.1f} s"
            + ("" if summary.layout == "global" else f"; chunks {summary.layout}")
        )
        if summary.finalized:
            print(f"dist_checkpointing_path: {summary.dist_checkpointing_path}")
        else:
            print("waiting for the other --shard parts; the last one writes .metadata")
    return 0 if summary.finalized else 1
