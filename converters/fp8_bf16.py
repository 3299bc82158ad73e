"""`convert fp8-bf16`: a DeepSeek-V3-style FP8 checkpoint to BF16 safetensors, sharded, resumable, exact.

Plan first (every header read and validated, every scale found through the index), then convert
shard by shard: a reader thread, the dequantisation, and a writer thread overlap; each output shard
is written to a temp file under DST/.fp8-bf16/ and renamed into place only when complete. A shard
whose output already holds exactly the expected header and size is skipped, so a killed run resumes
and ends byte-identical to an uninterrupted one. The index goes last: its presence means done.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from atomicio import AtomicFile, atomic_copy, atomic_write_bytes
from converters.jobs.claim import Destination
from converters.jobs.partition import balance
from converters.jobs.pool import run_workers
from converters.safetensors_io import (
    INDEX_NAME,
    OutputTensor,
    SafetensorsError,
    ShardHeader,
    TensorInfo,
    encode_header,
    load_index,
    order_for_writing,
    read_header,
    read_tensor,
    tensor_bytes,
)
from converters.safety import ConvertError, check_free_space, check_paths, check_readable, read_config, resolve_device
from kernels.fp8 import DEFAULT_BLOCK, FP8FormatError, dequant_fp8_blocks_batched, scale_shape
from patcher.hf_config import ConfigEdit, ConfigFormatError

STATE_DIR = ".fp8-bf16"
SCALE_SUFFIX = "_scale_inv"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_SKIP_DIRS = {".git", ".cache", STATE_DIR}


class CastError(ConvertError):
    """An expected failure of the FP8 cast; the message says what and what to do."""


@dataclass(frozen=True)
class CastOptions:
    drop_mtp: bool = False
    device: str = "auto"
    workers: int = 1
    shard_index: int = 0
    shard_count: int = 1
    overwrite: bool = False
    batch_bytes: int = 512 * 1024 * 1024
    max_write_bytes_per_s: float | None = None  # be gentle with a shared filesystem


@dataclass(frozen=True)
class TensorJob:
    """How one output tensor is made: copied, or dequantised from a weight and its scale."""

    output: OutputTensor
    source: TensorInfo
    source_path: Path
    scale: TensorInfo | None = None
    scale_path: Path | None = None

    @property
    def input_bytes(self) -> int:
        return self.source.nbytes + (self.scale.nbytes if self.scale else 0)


@dataclass
class ShardJob:
    name: str
    jobs: list[TensorJob]
    header: bytes

    @property
    def output_size(self) -> int:
        return len(self.header) + sum(job.output.nbytes for job in self.jobs)

    @property
    def input_bytes(self) -> int:
        return sum(job.input_bytes for job in self.jobs)


@dataclass
class CastPlan:
    src: Path
    dst: Path
    shards: list[ShardJob]
    block: tuple[int, int]
    has_index: bool
    index_metadata: dict[str, object]
    config_out: str | None  # the output's config.json, made (and so checked) while planning
    copies: list[Path]  # other files of the source, relative to it, copied as they are
    options: CastOptions
    identity: dict[str, object] = field(default_factory=dict)

    def my_shards(self) -> list[ShardJob]:
        """This machine's part under --shard I/N."""
        owned = balance([shard.output_size for shard in self.shards], self.options.shard_count)
        return [self.shards[i] for i in owned[self.options.shard_index]]

    def destination(self) -> Destination:
        return Destination(self.dst, self.dst / STATE_DIR, self.identity, self.options.shard_index,
                           self.options.shard_count, self.options.overwrite)


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


def layer_index(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def _block_size(config: dict[str, object], path: Path) -> tuple[int, int]:
    quantization = config.get("quantization_config") or {}
    block = quantization.get("weight_block_size", DEFAULT_BLOCK) if isinstance(quantization, dict) else DEFAULT_BLOCK
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CastError(f"{path}: quantization_config.weight_block_size is {block!r}, expected two positive integers such as [128, 128]")
    return (block[0], block[1])


def _output_config(config_text: str, path: Path, drop_mtp: bool) -> str:
    edit = ConfigEdit(drop_quantization=True, disable_mtp=drop_mtp, dtype="bfloat16")
    try:
        return edit.apply(config_text)
    except ConfigFormatError as exc:
        raise CastError(f"{path}: {exc}") from exc


def _files_to_copy(src: Path, shard_names: set[str]) -> list[Path]:
    """Every file of the source but the shards, the index and config.json (which are written anew)."""
    copies = []
    for path in sorted(src.rglob("*")):
        relative = path.relative_to(src)
        if relative.parts[0] in _SKIP_DIRS or str(relative) in shard_names | {INDEX_NAME, "config.json"}:
            continue
        if not path.is_dir():  # a broken link is kept here, so that the preflight names it
            copies.append(relative)
    return copies


def plan_cast(src: Path, dst: Path, options: CastOptions) -> CastPlan:
    """Read every header, find every scale, and check shapes; raise CastError listing all problems."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CastError(f"{src}: not a directory")
    config_path = src / "config.json"
    config_text, config = read_config(config_path) if config_path.exists() or config_path.is_symlink() else (None, {})
    try:
        weight_map, index_metadata = load_index(src)
        missing = [name for name in sorted(set(weight_map.values())) if not (src / name).is_file()]
        if missing:
            raise CastError(f"{src}: {len(missing)} shard(s) listed in {INDEX_NAME} are missing: {', '.join(missing[:5])}")
        headers = {name: read_header(src / name) for name in sorted(set(weight_map.values()))}
    except SafetensorsError as exc:
        raise CastError(str(exc)) from exc
    block = _block_size(config, config_path)
    num_layers = config.get("num_hidden_layers")
    if options.drop_mtp and not isinstance(num_layers, int):
        raise CastError(f"{src / 'config.json'}: --drop-mtp needs num_hidden_layers in config.json")

    problems: list[str] = []
    for tensor, shard in weight_map.items():
        if tensor not in headers[shard].tensors:
            problems.append(f"{shard}: {INDEX_NAME} maps {tensor} here but the shard does not hold it")
    shards = [
        _plan_shard(name, header, headers, weight_map, block, num_layers if options.drop_mtp else None, problems)
        for name, header in headers.items()
    ]
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CastError(f"{len(problems)} problem(s) in {src}, nothing written:\n  {shown}{more}")
    identity = {
        "tool": "convert fp8-bf16",
        "source": str(src.resolve()),
        "drop_mtp": options.drop_mtp,
        "shards": {name: [h.file_size, (src / name).stat().st_mtime_ns] for name, h in headers.items()},
    }
    config_out = None if config_text is None else _output_config(config_text, config_path, options.drop_mtp)
    copies = _files_to_copy(src, set(headers))
    return CastPlan(src, dst, shards, block, (src / INDEX_NAME).is_file(), index_metadata, config_out, copies, options, identity)


def _plan_shard(
    name: str,
    header: ShardHeader,
    headers: dict[str, ShardHeader],
    weight_map: dict[str, str],
    block: tuple[int, int],
    mtp_from_layer: int | None,
    problems: list[str],
) -> ShardJob:
    jobs = []
    for info in header.tensors.values():
        if info.name.endswith(SCALE_SUFFIX):
            continue
        layer = layer_index(info.name)
        if mtp_from_layer is not None and layer is not None and layer >= mtp_from_layer:
            continue
        if info.dtype != "F8_E4M3":
            jobs.append(TensorJob(OutputTensor(info.name, info.dtype, info.shape), info, header.path))
            continue
        scale_name = info.name + SCALE_SUFFIX
        scale_shard = weight_map.get(scale_name, name if scale_name in header.tensors else None)
        scale = headers[scale_shard].tensors.get(scale_name) if scale_shard in headers else None
        if scale is None:
            problems.append(f"{name}: tensor {info.name} is FP8 but {scale_name} is in no shard; the BF16 output would be wrong")
            continue
        if len(info.shape) != 2:
            problems.append(f"{name}: tensor {info.name} is FP8 with shape {list(info.shape)}; only 2-D block-quantised weights are supported")
            continue
        expected = list(scale_shape(info.shape, block))
        if scale.dtype != "F32" or list(scale.shape) != expected:
            problems.append(
                f"{scale_shard}: {scale_name} is {scale.dtype}{list(scale.shape)}, expected F32{expected} "
                f"for {info.name} {list(info.shape)} with {block[0]}x{block[1]} blocks"
            )
            continue
        jobs.append(TensorJob(OutputTensor(info.name, "BF16", info.shape), info, header.path, scale, headers[scale_shard].path))
    order = {t.name: i for i, t in enumerate(order_for_writing([job.output for job in jobs]))}
    jobs.sort(key=lambda job: order[job.output.name])
    return ShardJob(name, jobs, encode_header([job.output for job in jobs]))


def shard_is_done(dst: Path, shard: ShardJob) -> bool:
    """An output shard is complete iff it has exactly the expected header bytes and size."""
    path = dst / shard.name
    try:
        if path.stat().st_size != shard.output_size:
            return False
        with open(path, "rb") as handle:
            return handle.read(len(shard.header)) == shard.header
    except OSError:
        return False


def _remove_dead_temps(state_dir: Path) -> None:
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


class _Throttle:
    """Sleep after writes so the average rate stays under a limit (None: no limit)."""

    def __init__(self, bytes_per_s: float | None) -> None:
        self.bytes_per_s = bytes_per_s
        self.start = time.perf_counter()
        self.written = 0

    def wrote(self, count: int) -> None:
        if self.bytes_per_s:
            self.written += count
            ahead = self.written / self.bytes_per_s - (time.perf_counter() - self.start)
            if ahead > 0:
                time.sleep(ahead)


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
        throttle = _Throttle(plan.options.max_write_bytes_per_s)
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
    shutil.rmtree(plan.dst / STATE_DIR, ignore_errors=True)


def run_cast(plan: CastPlan, progress_factory: Callable[[int], Callable[[int], None]] | None = None) -> CastSummary:
    """Convert this part's pending shards, then finalize if every shard of every part is there."""
    start = time.perf_counter()
    summary = CastSummary(dst=str(plan.dst))
    mine = plan.my_shards()
    complete = (plan.dst / INDEX_NAME).is_file() or not plan.has_index and not (plan.dst / STATE_DIR).exists()
    if plan.dst.is_dir() and complete and all(shard_is_done(plan.dst, s) for s in plan.shards):
        summary.shards_skipped = len(mine)
        summary.finalized = True
        summary.seconds = time.perf_counter() - start
        return summary
    destination = plan.destination()
    check_paths(plan.src, plan.dst)
    destination.check()
    pending = [shard for shard in mine if not shard_is_done(plan.dst, shard)]
    summary.shards_skipped = len(mine) - len(pending)
    copies = [plan.src / relative for relative in plan.copies]
    check_readable(copies)
    copy_bytes = sum(path.stat().st_size for path in copies) + len(plan.config_out or "")
    check_free_space(plan.dst, sum(shard.output_size for shard in pending) + copy_bytes, f"{len(pending)} shard(s) and {len(copies)} other file(s)")
    device = resolve_device(plan.options.device)
    with destination.claim():
        _remove_dead_temps(plan.dst / STATE_DIR)
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
