"""Chunk layouts aligned to tensor parallelism: each stored chunk is one slice a Megatron rank asks for.

torch DCP's reader loads every stored chunk that overlaps a request whole, and megatron-core's load
does not deduplicate across ranks. A tensor stored at its global shape as one chunk is therefore read
TP times over (ETP for routed experts). `align_mapping` re-cuts the global plan of
`converters.mcore.mapping` so that every chunk lies inside one rank's slice: the checkpoint still
holds every tensor at its global shape (it loads at any TP/PP/EP), only the chunk boundaries move.

How megatron-core 0.16.1 shards each tensor (checked against the real model's `sharded_state_dict`
at TP2 x EP2 in tests/test_converters/test_mcore_tp_layout.py):
- column-parallel (dim 0, after the expert axis for routed experts): attention up projections, the
  vocab-parallel embedding and output layer, the MTP `eh_proj`, and SwiGLU `linear_fc1`, whose gate
  and up halves are two requests (`apply_swiglu_sharded_factory`), so each half is cut on its own;
- row-parallel (last dim): `linear_proj`, `linear_fc2`;
- replicated: norms (also the TE-fused `layer_norm_weight`), the router weight and expert bias.
The MLA down projections are column-parallel in the local spec and in the patched TE spec (`patcher`),
and duplicated (whole on every rank) in the unpatched TE spec. They are cut like column-parallel
weights: a rank that asks for the whole tensor then reads all its chunks, which is still exactly
its own bytes, so the one layout is right for both.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from converters.mcore.mapping import Chunk, MappingPlan, McoreTensor
from converters.mcore.params import COLUMN, REPLICATED, ROW, sharding_table
from toolkit.errors import ConvertError

# mcore key (after its layer prefix) -> how TP splits it, and the keys ETP splits instead (routed experts):
# the TP facts of the model description (converters/mcore/params.py)
SHARDING: dict[str, str] = {name: kind for name, (kind, _) in sharding_table().items()}
EXPERT_SPLIT: frozenset[str] = frozenset(name for name, (_, expert) in sharding_table().items() if expert)
# a row-parallel tensor's full-width rows are read once per unit of at most this size and cut into
# its column slices (a unit waits in a small cache until its slices are made)
UNIT_BYTES = 64 * 1024 * 1024
UNIT_CACHE_BYTES = 2 * UNIT_BYTES
FP8_BLOCK_ROWS = 128


class LayoutError(ConvertError, ValueError):
    """A tensor the layout has no rule for; the message names it."""


@dataclass(frozen=True)
class Sharding:
    kind: str  # COLUMN, ROW or REPLICATED
    axis: int | None  # the split axis of the stored (global) tensor; None when replicated
    expert: bool  # split over ETP (routed experts) rather than TP


def sharding_of(key: str, ndim: int) -> Sharding:
    """How megatron-core splits the tensor stored under `key` (with `ndim` dims) across TP/ETP ranks."""
    for name, kind in SHARDING.items():
        if key == name or key.endswith("." + name):
            if kind == REPLICATED:
                return Sharding(kind, None, False)
            return Sharding(kind, ndim - 2 if kind == COLUMN else ndim - 1, name in EXPERT_SPLIT)
    raise LayoutError(f"{key}: no tensor-parallel rule for this tensor (converters/mcore/params.py, the model description)")


def split_points(start: int, length: int, parts: int) -> list[int]:
    """Boundaries of `parts` equal slices of [start, start + length); Megatron's slices when divisible."""
    step = -(-length // parts)
    return sorted({start + min(length, i * step) for i in range(parts + 1)})


def source_extents(chunks: list[Chunk], axis: int) -> dict[str, tuple[int, int]]:
    """Each source's extent along `axis`: one logical tensor that TP splits (gate and up are two; a
    tensor stored in row chunks is one)."""
    extents: dict[str, tuple[int, int]] = {}
    for chunk in chunks:
        low, high = chunk.offsets[axis], chunk.offsets[axis] + chunk.sizes[axis]
        if chunk.source in extents:
            low, high = min(low, extents[chunk.source][0]), max(high, extents[chunk.source][1])
        extents[chunk.source] = (low, high)
    return extents


def _source_axis(tensor: McoreTensor, axis: int) -> int:
    return axis - (len(tensor.shape) - 2)  # routed experts: the leading expert axis has no source dim


def _cut(chunk: Chunk, axis: int, source_axis: int, start: int, stop: int) -> Chunk:
    """The part [start, stop) (global coordinates along `axis`) of a chunk, with its source box."""
    offsets, sizes = list(chunk.offsets), list(chunk.sizes)
    shift = start - offsets[axis]
    offsets[axis], sizes[axis] = start, stop - start
    if source_axis == 0:
        base = chunk.rows[0] if chunk.rows else 0
        return Chunk(tuple(offsets), tuple(sizes), chunk.source, (base + shift, base + shift + stop - start), chunk.cols)
    base = chunk.cols[0] if chunk.cols else 0
    return Chunk(tuple(offsets), tuple(sizes), chunk.source, chunk.rows, (base + shift, base + shift + stop - start))


def _row_units(tensor: McoreTensor, chunk: Chunk, itemsize: int) -> list[Chunk]:
    """A 2-D row-parallel chunk cut into row blocks of at most UNIT_BYTES (starts on FP8 block rows)."""
    if len(tensor.shape) != 2:
        return [chunk]
    rows, width = chunk.sizes
    step = max(FP8_BLOCK_ROWS, UNIT_BYTES // (width * itemsize) // FP8_BLOCK_ROWS * FP8_BLOCK_ROWS)
    if rows <= step:
        return [chunk]
    return [_cut(chunk, 0, 0, chunk.offsets[0] + r, chunk.offsets[0] + min(rows, r + step)) for r in range(0, rows, step)]


def align_tensor(tensor: McoreTensor, tp: int, etp: int, itemsize: int = 2) -> McoreTensor:
    """The tensor's chunks cut at its TP (or ETP) slice boundaries; each source (a SwiGLU half) on its own."""
    sharding = sharding_of(tensor.key, len(tensor.shape))
    parts = etp if sharding.expert else tp
    if sharding.kind == REPLICATED or parts == 1:
        return tensor
    axis = sharding.axis
    source_axis = _source_axis(tensor, axis)
    extents = source_extents(tensor.chunks, axis)
    aligned = McoreTensor(tensor.key, tensor.shape)
    for chunk in tensor.chunks:
        pieces = _row_units(tensor, chunk, itemsize) if sharding.kind == ROW else [chunk]
        low, high = extents[chunk.source]
        points = split_points(low, high - low, parts)
        for piece in pieces:
            begin, end = piece.offsets[axis], piece.offsets[axis] + piece.sizes[axis]
            cuts = [begin] + [p for p in points if begin < p < end] + [end]
            aligned.chunks += [_cut(piece, axis, source_axis, a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    return aligned


def align_mapping(mapping: MappingPlan, tp: int, etp: int) -> MappingPlan:
    """The same tensors and objects, every chunk inside one TP (ETP) slice."""
    if tp < 1 or etp < 1:
        raise LayoutError(f"TP and ETP must be >= 1, got TP={tp} ETP={etp}")
    tensors = [align_tensor(tensor, tp, etp, 4 if tensor.key.endswith("expert_bias") else 2) for tensor in mapping.tensors]
    return MappingPlan(tensors, mapping.objects, mapping.used_sources)


class BoxReader:
    """Makes a chunk's data from its box of the source tensor (rows, and columns in aligned layouts).

    A chunk with whole block-aligned rows is read as before, straight into a pooled buffer. Column
    slices (row-parallel weights) and row ranges that split an FP8 block come from a unit (the
    block-aligned full-width rows) read once and kept in a small cache until its other slices have
    been made, so a row-parallel tensor is read and dequantised once whatever the TP.
    """

    def __init__(self, source, buffers=None, cache_bytes: int = UNIT_CACHE_BYTES) -> None:
        self.source = source
        self.buffers = buffers
        self.cache_bytes = cache_bytes
        self.units: OrderedDict[tuple[str, tuple[int, int]], tuple[Future, int]] = OrderedDict()
        self.lock = threading.Lock()
        self.units_read = 0

    def _unit_rows(self, chunk: Chunk) -> tuple[int, int]:
        shape = self.source.shape(chunk.source)
        rows = chunk.rows or (0, shape[0])
        if not self.source.is_fp8(chunk.source):
            return rows
        block = self.source.block[0]
        if rows[0] % block == 0 and (rows[1] % block == 0 or rows[1] == shape[0]):
            return rows
        if math.prod(shape) * 2 <= UNIT_BYTES:  # small (e.g. kv_down_proj's 576 rows): dequantise once for all slices
            return 0, shape[0]
        return rows[0] // block * block, min(shape[0], -(-rows[1] // block) * block)

    def __call__(self, chunk: Chunk) -> torch.Tensor:
        unit_rows = self._unit_rows(chunk)
        if chunk.cols is None and unit_rows == (chunk.rows or unit_rows):
            return self.source.read(chunk.source, chunk.rows, self.buffers)
        unit = self._unit(chunk.source, unit_rows)
        rows = chunk.rows or unit_rows
        box = unit[rows[0] - unit_rows[0]:rows[1] - unit_rows[0]]
        if chunk.cols is not None:
            box = box[:, chunk.cols[0]:chunk.cols[1]]
        if self.buffers is None:
            return box.contiguous()
        out = self.buffers.take(box.numel() * box.element_size()).view(box.dtype).view(box.shape)
        return out.copy_(box)

    def _unit(self, name: str, rows: tuple[int, int]) -> torch.Tensor:
        key = (name, rows)
        with self.lock:
            entry = self.units.get(key)
            if entry is None:
                future: Future = Future()
                width = self.source.shape(name)[1] if len(self.source.shape(name)) > 1 else 1
                entry = (future, (rows[1] - rows[0]) * width * 2)
                self.units[key] = entry
                owner = True
                while len(self.units) > 1 and sum(size for _, size in self.units.values()) > self.cache_bytes:
                    self.units.popitem(last=False)  # a unit evicted early is simply read again
            else:
                self.units.move_to_end(key)
                owner = False
        future = entry[0]
        if owner:
            try:
                # not from the pool: an evicted unit may still be sliced by another thread
                future.set_result(self.source.read(name, rows))
                with self.lock:
                    self.units_read += 1
            except BaseException as exc:
                future.set_exception(exc)
                with self.lock:
                    self.units.pop(key, None)
        return future.result()
