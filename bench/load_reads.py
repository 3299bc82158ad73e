"""What each rank reads when Megatron-Core really loads a torch_dist checkpoint: every byte counted.

The measuring counterpart of the read planner (`converters.mcore.read_cost`), which tests check against it:
- `CountingReader` / `counting_reads()`: a real load, with the bytes each rank pulls through its file
  streams counted (tensors and `_extra_state` objects apart) next to the bytes it asked for. It swaps
  megatron-core's reader factory while inside, so it lives here with the benches, not in the converters.
- `measure_load()` (and `python -m bench.load_reads`): a tiny model loaded on CPU in tp*ep gloo processes.
"""

from __future__ import annotations

import dataclasses
import io
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadItemType

from converters.mcore.read_cost import Request


@dataclass
class ReadCount:
    """Bytes one reader moved: through its file streams (`stream_*`), as whole stored records, as asked for."""

    stream_tensor_bytes: int = 0
    stream_object_bytes: int = 0
    record_bytes: int = 0  # sum of the stored chunk records read (each read whole, once per request)
    needed_bytes: int = 0  # the requested parts of those chunks: what the rank keeps

    def add(self, other: ReadCount) -> None:
        for name in ("stream_tensor_bytes", "stream_object_bytes", "record_bytes", "needed_bytes"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


class _CountingStream(io.RawIOBase):
    def __init__(self, stream, counter: list[int]) -> None:
        super().__init__()
        self.stream = stream
        self.counter = counter

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.stream.seek(offset, whence)

    def tell(self) -> int:
        return self.stream.tell()

    def readinto(self, buffer) -> int:
        count = self.stream.readinto(buffer)
        self.counter[0] += count or 0
        return count

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.counter[0] += len(data)
        return data


class _CountingFileSystem(FileSystem):
    def __init__(self) -> None:
        super().__init__()
        self.counter = [0]

    @contextmanager
    def create_stream(self, path, mode):
        with super().create_stream(path, mode) as stream:
            yield _CountingStream(stream, self.counter) if "r" in mode else stream


class CountingReader(FileSystemReader):
    """torch's FileSystemReader, counting the bytes read from `.distcp` files for tensors and for objects."""

    def __init__(self, path, cache_metadata: bool = True) -> None:
        super().__init__(path)
        self.fs = _CountingFileSystem()
        self.count = ReadCount()
        self._metadata: Metadata | None = None
        self._cache_metadata = cache_metadata

    def read_metadata(self) -> Metadata:  # megatron-core asks for it again after the load
        if self._metadata is None or not self._cache_metadata:
            self._metadata = super().read_metadata()
        return self._metadata

    def read_data(self, plan, planner):
        metadata = self.read_metadata()
        objects = [item for item in plan.items if item.type == LoadItemType.BYTE_IO]
        tensors = [item for item in plan.items if item.type != LoadItemType.BYTE_IO]
        for items, field_name in ((objects, "stream_object_bytes"), (tensors, "stream_tensor_bytes")):
            before = self.fs.counter[0]
            super().read_data(dataclasses.replace(plan, items=items), planner).wait()
            setattr(self.count, field_name, getattr(self.count, field_name) + self.fs.counter[0] - before)
        for item in tensors:
            itemsize = metadata.state_dict_metadata[item.storage_index.fqn].properties.dtype.itemsize
            self.count.record_bytes += self.storage_data[item.storage_index].length
            self.count.needed_bytes += math.prod(int(size) for size in item.lengths) * itemsize
        done: torch.futures.Future = torch.futures.Future()
        done.set_result(None)
        return done


@contextmanager
def counting_reads() -> Iterator[ReadCount]:
    """Every torch_dist load megatron-core makes in this process reads through a CountingReader; the
    yielded ReadCount sums them (filled in as the loads happen)."""
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch

    total = ReadCount()
    lock = threading.Lock()
    original = mcore_torch._get_filesystem_reader

    class _Reader(CountingReader):
        def read_data(self, plan, planner):
            before = dataclasses.replace(self.count)
            result = super().read_data(plan, planner)
            with lock:
                total.add(ReadCount(*(getattr(self.count, f.name) - getattr(before, f.name) for f in dataclasses.fields(ReadCount))))
            return result

    mcore_torch._get_filesystem_reader = lambda checkpoint_dir, cache_metadata=False: _Reader(checkpoint_dir, cache_metadata)
    try:
        yield total
    finally:
        mcore_torch._get_filesystem_reader = original


def requested_slices(sharded_state_dict) -> list[Request]:
    """The tensor slices a model's sharded_state_dict asks for (SwiGLU factories expanded into their halves)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    requests = []
    for value in nested_values(sharded_state_dict):
        parts = [value]
        if isinstance(value, ShardedTensorFactory):
            built = value.build()
            parts = list(nested_values(built)) if isinstance(built, dict) else list(built) if isinstance(built, list) else [built]
        for part in parts:
            if isinstance(part, ShardedTensor):
                sizes = (1,) * part.prepend_axis_num + tuple(int(s) for s in part.local_shape)  # the expert axis
                requests.append(Request(part.key, tuple(int(o) for o in part.global_offset), sizes))
    return requests


def _measure_rank(rank: int, world: int, port: int, hf_dir: str, mcore_dir: str, tp: int, ep: int, spec: str, result: str) -> None:
    import json

    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from converters.mcore.check import build_model
    from converters.mcore.shim import install_cpu_shim
    from converters.mcore.world import init_distributed

    install_cpu_shim()
    init_distributed(rank, world, port, tp=tp, ep=ep)
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    model = build_model(config, tp, 1, ep, spec)
    metadata = {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    requests = requested_slices(model.sharded_state_dict(metadata=metadata))
    with counting_reads() as count:
        # verl's call, as in converters.mcore.check
        dist_checkpointing.load(model.sharded_state_dict(metadata=metadata), mcore_dir, strict=StrictHandling.ASSUME_OK_UNEXPECTED)
    record = {"rank": rank, "count": dataclasses.asdict(count), "requests": [dataclasses.astuple(r) for r in requests]}
    Path(f"{result}.{rank}").write_text(json.dumps(record))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def measure_load(hf_dir, mcore_dir, tp: int = 1, ep: int = 1, spec: str = "te") -> list[dict[str, Any]]:
    """Load the checkpoint into a real Megatron-Core model in tp*ep gloo processes (ETP = TP); per rank:
    its ReadCount as a dict and the slices it asked for."""
    import json
    import os
    import tempfile

    from converters.mcore.world import free_port

    world = tp * ep
    with tempfile.TemporaryDirectory() as scratch:
        result = os.path.join(scratch, "reads")
        args = (world, free_port(), str(hf_dir), str(mcore_dir), tp, ep, spec, result)
        torch.multiprocessing.start_processes(_measure_rank, args=args, nprocs=world, start_method="spawn", join=True)
        records = [json.loads(open(f"{result}.{rank}").read()) for rank in range(world)]
    for record in records:
        record["requests"] = [Request(key, tuple(offsets), tuple(sizes)) for key, offsets, sizes in record["requests"]]
    return records


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Load a torch_dist checkpoint into a real Megatron-Core model on CPU "
                                     "(gloo, tp*ep processes) and print the bytes each rank read.")
    parser.add_argument("--hf", type=Path, required=True, help="HF dir (config.json) of the model")
    parser.add_argument("--mcore", type=Path, required=True, help="the dist_checkpointing_path (.../release)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--spec", choices=["te", "local"], default="te")
    args = parser.parse_args(argv)
    for record in measure_load(args.hf, args.mcore, args.tp, args.ep, args.spec):
        count = record["count"]
        print(json.dumps({"rank": record["rank"], **count, "requests": len(record["requests"]),
                          "stream_over_needed": round(count["stream_tensor_bytes"] / count["needed_bytes"], 4),
                          "records_over_needed": round(count["record_bytes"] / count["needed_bytes"], 4)}))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
