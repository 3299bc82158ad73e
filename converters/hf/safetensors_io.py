"""Lazy, validated safetensors I/O: read single tensors by offset, stream shards out tensor by tensor.

Headers and the index are read by `toolkit.safetensors_index` (patcher needs them too); this module adds
what needs torch: the dtype table, tensor reads, and the writer's header.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from toolkit.safetensors_index import ITEMSIZE, SafetensorsError, TensorInfo

# keyed by the same dtype names as toolkit.safetensors_index.ITEMSIZE, the ones read_header accepts
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def read_tensor(path: Path, info: TensorInfo, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor's bytes with pread (no mmap of the whole shard); `out` may be pinned memory."""
    if out is None:
        out = torch.empty(info.nbytes, dtype=torch.uint8)
    view = out.numpy()[: info.nbytes] if info.nbytes else out.numpy()[:0]
    with open(path, "rb", buffering=0) as handle:
        done = 0
        while done < info.nbytes:
            count = os.preadv(handle.fileno(), [memoryview(view[done:])], info.start + done)
            if count == 0:
                raise SafetensorsError(f"{path}: tensor {info.name}: file ended early (truncated shard)")
            done += count
    return out[: info.nbytes].view(DTYPES[info.dtype]).view(info.shape)


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * ITEMSIZE[self.dtype]


def order_for_writing(tensors: list[OutputTensor]) -> list[OutputTensor]:
    """Wider dtypes first, then by name: every tensor starts at an offset aligned to its item size."""
    return sorted(tensors, key=lambda t: (-ITEMSIZE[t.dtype], t.name))


def encode_header(tensors: list[OutputTensor], metadata: dict[str, str] | None = None) -> bytes:
    """The exact header bytes (length prefix included) for tensors written in the given order."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for tensor in tensors:
        header[tensor.name] = {"dtype": tensor.dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def file_offsets(header: bytes, tensors: list[OutputTensor]) -> dict[str, int]:
    """Where each tensor's bytes start in a file made of `header` then `tensors` in that order."""
    offsets, offset = {}, len(header)
    for tensor in tensors:
        offsets[tensor.name] = offset
        offset += tensor.nbytes
    return offsets


def is_complete(path: Path, header: bytes, size: int) -> bool:
    """A shard we wrote is complete iff it has exactly the expected size and header bytes (shards are renamed into
    place whole, so a kill never leaves one that passes and is not)."""
    try:
        if path.stat().st_size != size:
            return False
        with open(path, "rb") as handle:
            return handle.read(len(header)) == header
    except OSError:
        return False


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    flat = tensor.contiguous().view(-1).view(torch.uint8)
    return memoryview(flat.numpy())
