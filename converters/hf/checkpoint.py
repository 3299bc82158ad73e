"""A HF checkpoint opened lazily: one tensor at a time by name, FP8 weights dequantised on the fly.

`dequantise` is the one FP8 path of the converters: `convert fp8-bf16` (in batches, per shard) and
this reader (per tensor, for `convert hf-mcore`) both hand it the e4m3 bytes and scale_inv they read.
`quantise`, its inverse, is the one path of `convert bf16-fp8` and `convert mcore-hf --fp8`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from converters.hf.buffers import BufferPool
from converters.hf.safetensors_io import DTYPES, read_tensor
from converters.preflight import read_config
from kernels.fp8 import DEFAULT_BLOCK, dequant_fp8_blocks_batched, quant_fp8_blocks_batched
from toolkit.errors import ConvertError
from toolkit.safetensors_index import SafetensorsError, TensorInfo, load_index, read_header

SCALE_SUFFIX = "_scale_inv"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The decoder layer a tensor belongs to (model.layers.N. ...), or None."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def beyond_declared_layers(shapes: dict, config: dict, drop_mtp: bool) -> tuple[set[str], list[str]]:
    """config.json is the model: tensors of layers at or beyond num_hidden_layers + num_nextn_predict_layers
    (the MTP layers a patched config.json or --drop-mtp leaves out) are skipped, with one line saying so."""
    layers = config["num_hidden_layers"]
    mtp = 0 if drop_mtp else (config.get("num_nextn_predict_layers") or 0)
    skipped = {name for name in shapes if (layer_index(name) or 0) >= layers + mtp}
    if not skipped:
        return skipped, []
    which = sorted({layer_index(name) for name in skipped})
    named = f"layer{'s' if len(which) > 1 else ''} {', '.join(map(str, which))}"
    why = "--drop-mtp" if drop_mtp and config.get("num_nextn_predict_layers") else \
        f"config.json declares {'no' if mtp == 0 else mtp} MTP layer{'s' if mtp > 1 else ''}"
    return skipped, [f"{why}: {len(skipped)} tensors of {named} skipped"]


def row_range(info: TensorInfo, start: int, stop: int) -> TensorInfo:
    """The TensorInfo of rows [start, stop) of a row-major tensor."""
    row_bytes = info.nbytes // info.shape[0]
    return TensorInfo(info.name, info.dtype, (stop - start, *info.shape[1:]), info.start + start * row_bytes, info.start + stop * row_bytes)


def dequantise(weights: list[torch.Tensor], scales: list[torch.Tensor], block: tuple[int, int], device: torch.device,
               outs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """BF16 host tensors from e4m3 host weights and their float32 scale_inv, dequantised on `device` as one batch.

    On a GPU one kernel launch serves the batch and the results come back into `outs` (else into
    page-locked buffers) asynchronously, with one synchronisation; on the CPU they are made in
    `outs` (else new tensors). Raises kernels.fp8.FP8FormatError (a ValueError) for a bad pair;
    the caller names the file and tensor.
    """
    if device.type == "cpu":
        return dequant_fp8_blocks_batched(weights, scales, block, outs)
    on_device = dequant_fp8_blocks_batched([weight.to(device, non_blocking=True) for weight in weights],
                                           [scale.to(device, non_blocking=True) for scale in scales], block)
    return _to_host(on_device, device, outs)


def quantise(weights: list[torch.Tensor], block: tuple[int, int], device: torch.device,
             priors: list[torch.Tensor | None] | None = None, names: list[str] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(e4m3 codes, float32 scale_inv) host tensors from BF16 (or float32) host weights, quantised on `device` as one
    batch by the release's recipe; a `priors` entry (the release's scale_inv) is kept for every block it still
    reproduces exactly. Raises kernels.fp8.FP8FormatError naming the tensor and position of a NaN or Inf."""
    if device.type == "cpu":
        return quant_fp8_blocks_batched(weights, block, prior_scales=priors, names=names)
    moved = [None if prior is None else prior.to(device, non_blocking=True) for prior in priors or [None] * len(weights)]
    on_device = quant_fp8_blocks_batched([weight.to(device, non_blocking=True) for weight in weights], block,
                                         prior_scales=moved, names=names)
    hosts = _to_host([tensor for pair in on_device for tensor in pair], device)
    return list(zip(hosts[0::2], hosts[1::2], strict=True))


def _to_host(tensors: list[torch.Tensor], device: torch.device, outs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """GPU results copied into `outs` (else new page-locked buffers) asynchronously, then one synchronisation."""
    hosts = outs if outs is not None else [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for host, tensor in zip(hosts, tensors, strict=True):
        host.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(device).synchronize()
    return hosts


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
        outs = None if buffers is None else [buffers.take(info.numel * 2).view(torch.bfloat16).view(info.shape)]
        try:
            [result] = dequantise([tensor], [scale], self.block, self.device, outs)
        except ValueError as exc:
            raise SourceError(f"{path}: {name}: {exc}") from exc
        if buffers is not None:
            buffers.give(tensor)
        return result
