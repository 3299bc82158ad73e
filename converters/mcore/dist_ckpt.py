"""Streaming writer of Megatron-Core `torch_dist` checkpoints through torch's own DCP file writer.

No model is built and nothing is gathered: every tensor is planned at its global shape as chunks,
the chunks are packed into bins of bounded size, and each bin becomes one `.distcp` file written by
torch's FileSystemWriter, which asks our planner for one chunk at a time (`resolve_data`). A chunk
is read (and dequantised) only then, so memory stays near one bin whatever the model size. Bins are
independent: workers and machines can write different bins, and the `.metadata` index is written
last from all of their results.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import _StoragePrefix
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, TensorWriteData, WriteItem, WriteItemType

from atomicio import atomic_write_bytes, fsync_dir
from converters.jobs.throttle import Throttle
from converters.mcore.mapping import Chunk, MappingPlan

# What megatron-core reads to recognise a torch_dist checkpoint (all four fields: 0.12 .. 0.19).
CHECKPOINT_METADATA = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
COMMON_STATE = {"checkpoint_version": 3.0, "iteration": 0}
RELEASE_DIR = "release"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
STATE_DIR = ".hf-mcore"
DONE_FILE = ".hf-mcore-source.json"  # kept: lets a re-run recognise its own finished output
BIN_BYTES = 512 * 1024 * 1024
PREFETCH_BYTES = 256 * 1024 * 1024  # chunks made ahead of the writer, beyond the one it is writing


@dataclass(frozen=True)
class Piece:
    """One WriteItem and how to make its data."""

    item: WriteItem
    chunk: Chunk | None  # None: a ShardedObject (empty `_extra_state`)
    nbytes: int


def _payload_none() -> io.BytesIO:
    # megatron-core stores a ShardedObject as torch.save([data]); None means "no FP8 state"
    buffer = io.BytesIO()
    torch.save([None], buffer)
    buffer.seek(0)
    return buffer


def plan_pieces(mapping: MappingPlan, dtype_of: Callable[[str], torch.dtype]) -> tuple[list[Piece], Metadata]:
    """WriteItems for every chunk and object, and the global DCP metadata (storage filled later)."""
    pieces: list[Piece] = []
    state: dict[str, object] = {}
    for tensor in mapping.tensors:
        dtype = dtype_of(tensor.chunks[0].source)
        properties = TensorProperties(dtype=dtype)
        size = torch.Size(tensor.shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        chunks = []
        for chunk in tensor.chunks:
            storage = ChunkStorageMetadata(offsets=torch.Size(chunk.offsets), sizes=torch.Size(chunk.sizes))
            chunks.append(storage)
            item = WriteItem(
                index=MetadataIndex(tensor.key, torch.Size(chunk.offsets)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(chunk=storage, properties=properties, size=size),
            )
            pieces.append(Piece(item, chunk, int(torch.Size(chunk.sizes).numel()) * itemsize))
        state[tensor.key] = TensorStorageMetadata(properties=properties, size=size, chunks=chunks)
    for key in mapping.objects:
        pieces.append(Piece(WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO), None, 64))
        state[key] = BytesStorageMetadata()
    metadata = Metadata(state_dict_metadata=state, planner_data={key: (key,) for key in state})
    return pieces, metadata


def make_bins(pieces: list[Piece], limit: int = BIN_BYTES) -> list[list[Piece]]:
    """Consecutive pieces packed into bins of at most `limit` bytes (a bigger piece gets its own)."""
    bins: list[list[Piece]] = []
    size = 0
    for piece in pieces:
        if not bins or (size + piece.nbytes > limit and bins[-1]):
            bins.append([])
            size = 0
        bins[-1].append(piece)
        size += piece.nbytes
    return bins


class StreamingPlanner(SavePlanner):
    """Hands torch's writer the data of one piece at a time, made by `make_chunk` in background threads.

    torch's single-file writer asks for the byte items first, then the tensors in plan order, and
    writes each one before asking for the next; the next tensors (up to PREFETCH_BYTES) are read and
    dequantised by `readers` threads while the current one is written. An item asked for out of that
    order is simply made on the spot. Once the writer asks for the next tensor, the one before it has
    been written and goes to `recycle` (a BufferPool's `give`), so its buffer serves a later chunk.
    """

    def __init__(self, pieces: list[Piece], make_chunk: Callable[[Chunk], torch.Tensor], progress: Callable[[int], None],
                 prefetch_bytes: int = PREFETCH_BYTES, readers: int = 1,
                 recycle: Callable[[torch.Tensor], None] | None = None) -> None:
        self.pieces = {piece.item.index: piece for piece in pieces}
        self.order = [piece.item.index for piece in pieces if piece.chunk is not None]
        self.position = {index: i for i, index in enumerate(self.order)}
        self.make_chunk = make_chunk
        self.progress = progress
        self.prefetch_bytes = prefetch_bytes
        self.readers = readers
        self.recycle = recycle
        self.pending: dict[MetadataIndex, Future] = {}
        self.served: set[MetadataIndex] = set()
        self.written: torch.Tensor | None = None  # the tensor handed out last: written once the next is asked for
        self.executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        # busy seconds making chunks (summed over reader threads); the writer blocked on them
        self.seconds = {"read": 0.0, "wait_for_read": 0.0}

    def set_up_planner(self, *args, **kwargs) -> None:  # the plan is made by plan_pieces
        pass

    def create_local_plan(self) -> SavePlan:
        raise NotImplementedError

    def create_global_plan(self, all_plans):
        raise NotImplementedError

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        return new_plan

    def _make(self, piece: Piece) -> torch.Tensor:
        start = time.perf_counter()
        made = self.make_chunk(piece.chunk)
        expected = tuple(piece.chunk.sizes)
        data = (made if tuple(made.shape) == expected else made.reshape(expected)).contiguous()
        if self.recycle is not None and data.untyped_storage().data_ptr() != made.untyped_storage().data_ptr():
            self.recycle(made)  # copied: the buffer it was read into is free again
        with self._lock:
            self.seconds["read"] += time.perf_counter() - start
        return data

    def done_with_last(self) -> None:
        """The writer has written the tensor handed out last: its buffer may be reused."""
        if self.written is not None and self.recycle is not None:
            self.recycle(self.written)
        self.written = None

    def _prefetch_after(self, index: MetadataIndex) -> None:
        ahead = sum(self.pieces[i].nbytes for i in self.pending)  # made or being made, not yet asked for
        for following in self.order[self.position[index] + 1:]:
            if following in self.pending or following in self.served:
                continue
            piece = self.pieces[following]
            if ahead and ahead + piece.nbytes > self.prefetch_bytes:
                break
            ahead += piece.nbytes
            self.pending[following] = self.executor.submit(self._make, piece)

    def resolve_data(self, write_item: WriteItem):
        piece = self.pieces[write_item.index]
        if piece.chunk is None:
            return _payload_none()
        self.done_with_last()
        future = self.pending.pop(write_item.index, None)
        self.served.add(write_item.index)
        if self.executor is not None and self.prefetch_bytes > 0:
            self._prefetch_after(write_item.index)
        start = time.perf_counter()
        data = future.result() if future is not None else self._make(piece)
        self.seconds["wait_for_read"] += time.perf_counter() - start
        self.progress(piece.nbytes)
        self.written = data
        return data

    @contextmanager
    def prefetching(self) -> Iterator[None]:
        self.executor = ThreadPoolExecutor(max_workers=self.readers, thread_name_prefix="hf-mcore-read")
        try:
            yield
        finally:
            for future in self.pending.values():
                future.cancel()
            self.executor.shutdown(wait=True)
            self.pending.clear()
            self.executor = None


@contextmanager
def _without_zip_crc32() -> Iterator[None]:
    """torch.save's per-record CRC-32 runs at 0.3-1 GB/s, slower than the disk. torch.load has never
    checked it (torch builds miniz without reader CRC checks), so the files load the same without it."""
    try:
        from torch.utils.serialization import config

        before = config.save.compute_crc32
    except (ImportError, AttributeError):  # torch < 2.6: no switch, CRCs are written
        yield
        return
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = before


def _results_path(release: Path, index: int) -> Path:
    return release / STATE_DIR / f"bin_{index:06d}.results"


def bin_done(release: Path, index: int) -> bool:
    return _results_path(release, index).is_file() and (release / f"__{index}_0.distcp").is_file()


def forget_bins(release: Path, bins: int) -> None:
    """Starting over: no bin or `.metadata` already there counts as this conversion's."""
    for index in range(bins):
        _results_path(release, index).unlink(missing_ok=True)
    (release / ".metadata").unlink(missing_ok=True)


class BinWriter:
    """Writes bins one after another as `__{index}_0.distcp`; each bin's fsync and done-mark (its results
    file) happen in a background thread while the next bin is written. A bin counts as done only once its
    file is on disk, so a kill at any point leaves nothing that looks finished and is not.
    """

    def __init__(self, release: Path, readers: int = 1, recycle: Callable[[torch.Tensor], None] | None = None,
                 max_write_bytes_per_s: float | None = None) -> None:
        self.release = release
        self.throttle = Throttle(max_write_bytes_per_s)
        self.readers = readers
        self.recycle = recycle
        self.committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-mcore-fsync")
        self.commits: list[Future] = []
        # busy time: read = chunks read and dequantised (overlaps writing), write = torch's writer including
        # its waits for chunks, wait_for_read = those waits, wait_for_fsync = the previous bin not yet on disk
        self.seconds = {"read": 0.0, "write": 0.0, "wait_for_read": 0.0, "wait_for_fsync": 0.0}

    def __enter__(self) -> BinWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        if exc_info[0] is None:
            self.close()
        else:
            self.abandon()

    def close(self) -> None:
        """Every bin written is on disk with its done-mark; raises a failed fsync or done-mark."""
        self.committer.shutdown(wait=True)
        for commit in self.commits:
            commit.result()

    def abandon(self) -> None:
        """After a failure: wait for the committer, raising nothing over the first error."""
        self.committer.shutdown(wait=True)

    def write(self, index: int, pieces: list[Piece], make_chunk: Callable[[Chunk], torch.Tensor], progress=lambda n: None) -> None:
        writer = FileSystemWriter(str(self.release), single_file_per_rank=True, sync_files=False, thread_count=1, per_thread_copy_ahead=0)
        writer.set_up_storage_writer(is_coordinator=True)
        plan = SavePlan([piece.item for piece in pieces], storage_data=_StoragePrefix(f"__{index}_"))
        planner = StreamingPlanner(pieces, make_chunk, progress, readers=self.readers, recycle=self.recycle)
        start = time.perf_counter()
        try:
            with planner.prefetching(), _without_zip_crc32():
                results = writer.write_data(plan, planner).wait()
        except RuntimeError as exc:
            raise _write_failure(self.release / f"__{index}_0.distcp", sum(p.nbytes for p in pieces), exc) from exc
        except OSError as exc:  # a failed write on an open file carries no file name: give it the bin's
            raise _named(exc, self.release / f"__{index}_0.distcp") from exc
        planner.done_with_last()
        self.throttle.wrote(sum(piece.nbytes for piece in pieces))
        written = time.perf_counter()
        for commit in self.commits:  # at most one bin waits for its fsync while the next is written
            commit.result()
        self.commits = [self.committer.submit(self._commit, index, results)]
        for stage, seconds in (*planner.seconds.items(), ("write", written - start), ("wait_for_fsync", time.perf_counter() - written)):
            self.seconds[stage] += seconds

    def _commit(self, index: int, results) -> None:
        path = self.release / f"__{index}_0.distcp"
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError as exc:
            raise _named(exc, path) from exc
        finally:
            os.close(fd)
        fsync_dir(self.release)
        atomic_write_bytes(_results_path(self.release, index), pickle.dumps(results))


def _named(exc: OSError, path: Path) -> OSError:
    return exc if exc.filename else OSError(exc.errno, exc.strerror, str(path))


def _write_failure(path: Path, nbytes: int, exc: RuntimeError) -> Exception:
    """torch's zip writer reports a failed write as an assertion ("unexpected pos"), without the errno; when
    the disk has less room than the bin, a full disk is the cause: say so, as the OSError it was."""
    if shutil.disk_usage(path.parent).free < nbytes:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return exc


def finish_checkpoint(out: Path, metadata: Metadata, bins: int, identity: str) -> Path:
    """Write `.metadata` from every bin's results, then the files megatron-core reads; returns release/.

    The finished mark (DONE_FILE) and the removal of the state dir follow, by the job lifecycle.
    """
    release = out / RELEASE_DIR
    results = [pickle.loads(_results_path(release, index).read_bytes()) for index in range(bins)]
    writer = FileSystemWriter(str(release), single_file_per_rank=True, sync_files=True)
    writer.set_up_storage_writer(is_coordinator=True)
    # a fixed save id keeps `.metadata` byte-identical between a resumed and an uninterrupted run
    writer.save_id = hashlib.sha256(identity.encode()).hexdigest()[:32]
    writer.finish(metadata, results)
    common = io.BytesIO()
    torch.save(COMMON_STATE, common)
    atomic_write_bytes(release / "common.pt", common.getvalue())
    atomic_write_bytes(release / "metadata.json", json.dumps(CHECKPOINT_METADATA).encode())
    atomic_write_bytes(out / TRACKER_FILE, b"release")
    return release
