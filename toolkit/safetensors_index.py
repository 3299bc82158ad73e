"""Reading a HF checkpoint's safetensors index and shard headers, validated, without torch.

Shared by the converters (which read tensors through `converters.hf.safetensors_io`) and by `patcher`
(which refuses to patch the config.json of a checkpoint that still holds FP8 weights).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import ConvertError

# bytes per element of each dtype name a safetensors header may use (the converters map them to torch dtypes)
ITEMSIZE: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
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
        if dtype not in ITEMSIZE:
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
