"""Lazy, validated safetensors I/O: read single tensors by offset, stream shards out tensor by tensor."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from converters.jobs.errors import ConvertError

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
ITEMSIZE = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ConvertError, ValueError):
    """A shard or index that cannot be read as promised; the message names the file and tensor."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: absolute file offsets, dtype name and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


@dataclass(frozen=True)
class ShardHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    file_size: int


def read_header(path: Path) -> ShardHeader:
    """Parse and validate a shard's header against the file size (catches truncated files)."""
    path = Path(path)
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise SafetensorsError(f"{path}: {file_size} bytes, too short for a safetensors header (truncated?)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(_MAX_HEADER, file_size - 8):
                raise SafetensorsError(f"{path}: header length {header_len} exceeds the file ({file_size} bytes): truncated or not safetensors")
            raw = handle.read(header_len)
    except OSError as exc:
        raise SafetensorsError(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SafetensorsError(f"{path}: header is not valid JSON ({exc}); the file is corrupt") from exc
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object; the file is corrupt")
    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise SafetensorsError(f"{path}: tensor {name}: malformed header entry {entry!r}") from exc
        if dtype not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {name}: unsupported dtype {dtype}")
        info = TensorInfo(name, dtype, shape, data_start + begin, data_start + end)
        if info.nbytes != info.numel * ITEMSIZE[dtype] or begin > end:
            raise SafetensorsError(f"{path}: tensor {name}: {info.nbytes} bytes do not hold {dtype}{list(shape)}")
        if info.end > file_size:
            raise SafetensorsError(
                f"{path}: tensor {name} ends at byte {info.end} but the file has {file_size} bytes: truncated shard"
            )
        tensors[name] = info
    return ShardHeader(path, tensors, metadata, file_size)


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


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    flat = tensor.contiguous().view(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def load_index(model_dir: Path) -> tuple[dict[str, str], dict[str, object]]:
    """weight_map (tensor -> shard file name) and index metadata; a single model.safetensors works too."""
    index_path = model_dir / INDEX_NAME
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise SafetensorsError(f"{index_path}: not a valid safetensors index ({exc})") from exc
        return dict(weight_map), dict(index.get("metadata") or {})
    single = model_dir / SINGLE_NAME
    if single.is_file():
        return {name: SINGLE_NAME for name in read_header(single).tensors}, {}
    raise SafetensorsError(f"{model_dir}: neither {INDEX_NAME} nor {SINGLE_NAME}; is this a Hugging Face model dir?")
