"""A HF checkpoint opened lazily: one tensor at a time by name, FP8 weights dequantised on the fly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from converters.hf.buffers import BufferPool
from converters.hf.safetensors_io import DTYPES, read_tensor
from converters.preflight import read_config
from kernels.fp8 import DEFAULT_BLOCK, dequant_fp8_blocks
from toolkit.errors import ConvertError
from toolkit.safetensors_index import SafetensorsError, TensorInfo, load_index, read_header

SCALE_SUFFIX = "_scale_inv"


def row_range(info: TensorInfo, start: int, stop: int) -> TensorInfo:
    """The TensorInfo of rows [start, stop) of a row-major tensor."""
    row_bytes = info.nbytes // info.shape[0]
    return TensorInfo(info.name, info.dtype, (stop - start, *info.shape[1:]), info.start + start * row_bytes, info.start + stop * row_bytes)


class SourceError(ConvertError, ValueError):
    """The HF checkpoint cannot give what was asked; the message names the file and tensor."""


class HFCheckpoint:
    """Index and headers read once; tensors read by pread when asked, never a whole shard."""

    def __init__(self, path: Path, device: torch.device | str = "cpu") -> None:
        self.path = Path(path)
        self.device = torch.device(device)
        self.config: dict[str, Any] = read_config(self.path / "config.json")[1]
        try:
            self.weight_map, _ = load_index(self.path)
            self.headers = {name: read_header(self.path / name) for name in sorted(set(self.weight_map.values()))}
        except (SafetensorsError, FileNotFoundError) as exc:
            raise SourceError(str(exc)) from exc
        quantization = self.config.get("quantization_config") or {}
        self.block = tuple(quantization.get("weight_block_size", DEFAULT_BLOCK))

    def names(self) -> set[str]:
        return {name for name in self.weight_map if not name.endswith(SCALE_SUFFIX)}

    def info(self, name: str) -> TensorInfo:
        shard = self.weight_map.get(name)
        if shard is None or name not in self.headers[shard].tensors:
            raise SourceError(f"{self.path}: tensor {name} is in no shard")
        return self.headers[shard].tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def is_fp8(self, name: str) -> bool:
        return self.info(name).dtype == "F8_E4M3"

    def output_dtype(self, name: str) -> torch.dtype:
        """What `read` returns: BF16 for FP8 weights, the stored dtype otherwise."""
        return torch.bfloat16 if self.is_fp8(name) else DTYPES[self.info(name).dtype]

    def read(self, name: str, rows: tuple[int, int] | None = None, buffers: BufferPool | None = None) -> torch.Tensor:
        """The tensor (or rows [start, stop) of it) as BF16 for FP8 weights, else as stored.

        For an FP8 weight, `start` must be a multiple of the block height. With `buffers`, the result
        lives in a buffer taken from that pool (the caller gives it back when done with it), and the
        FP8 bytes are read into a pooled buffer too; on a GPU the copies then go through pinned memory.
        """
        info = self.info(name)
        if rows is not None:
            info = row_range(info, *rows)
        path = self.path / self.weight_map[name]
        tensor = read_tensor(path, info, None if buffers is None else buffers.take(info.nbytes))
        if info.dtype != "F8_E4M3":
            return tensor
        scale_name = name + SCALE_SUFFIX
        if scale_name not in self.weight_map:
            raise SourceError(f"{self.path}: tensor {name} is FP8 but {scale_name} is in no shard")
        scale_info = self.info(scale_name)
        if rows is not None:
            if rows[0] % self.block[0]:
                raise SourceError(f"{name}: row range {rows} does not start on a {self.block[0]}-row block")
            scale_info = row_range(scale_info, rows[0] // self.block[0], -(-rows[1] // self.block[0]))
        scale = read_tensor(self.path / self.weight_map[scale_name], scale_info)
        out = None if buffers is None else buffers.take(info.numel * 2).view(torch.bfloat16).view(info.shape)
        try:
            if self.device.type == "cpu":
                result = dequant_fp8_blocks(tensor, scale, self.block, out)
            else:
                on_device = dequant_fp8_blocks(tensor.to(self.device, non_blocking=True), scale.to(self.device), self.block)
                result = on_device.cpu() if out is None else out.copy_(on_device, non_blocking=True)
                torch.cuda.current_stream(self.device).synchronize()
        except ValueError as exc:
            raise SourceError(f"{path}: {name}: {exc}") from exc
        if buffers is not None:
            buffers.give(tensor)
        return result
