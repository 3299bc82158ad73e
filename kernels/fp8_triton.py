"""Triton kernels for FP8 (e4m3) block dequantisation: one tensor, or many tensors in one launch.

On sm_89 and newer the GPU's own e4m3 and bf16 conversions are used. Elsewhere (sm_80/86, and under
TRITON_INTERPRET=1, whose float32 -> bfloat16 cast truncates instead of rounding to nearest even) e4m3
is decoded from its bits and bf16 rounded with integer operations. Both give the same bits.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

# e4m3 bits shifted into a float32 carry the exponent biased by 7 instead of 127: multiplying by
# 2**120 re-biases exactly (normal and subnormal values alike).
REBIAS = tl.constexpr(2.0**120)
SIGN_AND_MAGNITUDE = tl.constexpr(-2014314496)  # 0x87F00000 as int32
CANONICAL_NAN = tl.constexpr(0x7FFF)  # what the GPU's float32 -> bf16 conversion gives for any NaN
# Defaults measured on an H100 (bench/RESULTS.md): tiles of 128 rows by one scale block, 8 warps in the
# batched kernel, 4 for one tensor; a tensor too small to fill the GPU with those gets shorter tiles.
TILE_ROWS = 128
NUM_WARPS = 8
_MIN_TILE_ROWS = 32
_PROGRAMS_PER_SM = 6  # fewer 128-row tiles than this per SM: shorter tiles (q_a_proj: 64 rows, +1.2%)


@triton.jit
def _dequant_tile(
    weight, scale, out, rows, cols, tile_m, tile_n,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, TILE_ROWS: tl.constexpr, NATIVE: tl.constexpr, WIDE: tl.constexpr,
    LOCAL: tl.constexpr, EARLY_SCALE: tl.constexpr,
):
    """TILE_ROWS rows of one scale block's columns; TILE_ROWS divides BLOCK_ROWS, so one scale serves the tile.

    LOCAL and EARLY_SCALE change only the instruction schedule (on an H100, bench/RESULTS.md): one tensor
    at a time is 3% faster with per-element offsets and the scale loaded after the decode (fewer live
    registers, more tiles in flight); in the batched kernel every combination measured within 0.4%, and
    tile-local offsets with the scale first (its fastest, 95% of copy bandwidth) are kept there.
    """
    if WIDE:  # 2**31 elements or more: 64-bit row arithmetic
        row0 = tile_m.to(tl.int64) * TILE_ROWS
    else:
        row0 = tile_m * TILE_ROWS
    col0 = tile_n * BLOCK_COLS
    rr = tl.arange(0, TILE_ROWS)
    cc = tl.arange(0, BLOCK_COLS)
    mask = ((row0 + rr) < rows)[:, None] & ((col0 + cc) < cols)[None, :]
    if LOCAL:
        # a scalar tile base plus 32-bit tile-local offsets (< TILE_ROWS * cols): best in the batched kernel
        weight = weight + (row0 * cols + col0)
        out = out + (row0 * cols + col0)
        offsets = rr[:, None] * cols + cc[None, :]
    else:
        # offsets formed per element from row and column: best for one tensor at a time
        offsets = (row0 + rr)[:, None] * cols + (col0 + cc)[None, :]
    if TILE_ROWS == BLOCK_ROWS:
        scale_row = tile_m
    else:
        scale_row = tile_m // (BLOCK_ROWS // TILE_ROWS)
    factor_at = scale + scale_row * tl.cdiv(cols, BLOCK_COLS) + tile_n
    if EARLY_SCALE:
        factor = tl.load(factor_at)
    raw = tl.load(weight + offsets, mask=mask)
    if NATIVE:
        # sm_89+: hardware e4m3 decode and round-to-nearest-even bf16 conversion, which turns every
        # NaN into the canonical 0x7FFF by itself (checked on the GPU by bench/fp8_kernels.py)
        decoded = raw.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        if not EARLY_SCALE:
            factor = tl.load(factor_at)
        value = decoded * factor
        bf16 = value.to(tl.bfloat16).to(tl.int16, bitcast=True)
    else:
        # sm_80/86 (no e4m3 unit) and the interpreter (whose bf16 cast truncates): integer forms
        bits = (raw.to(tl.int32) << 20) & SIGN_AND_MAGNITUDE  # sign, 4 exponent, 3 mantissa bits
        if not EARLY_SCALE:
            factor = tl.load(factor_at)
        value = bits.to(tl.float32, bitcast=True) * REBIAS * factor
        rounded = value.to(tl.int32, bitcast=True)
        bf16 = ((rounded + 0x7FFF + ((rounded >> 16) & 1)) >> 16).to(tl.int16)
        is_nan = ((raw.to(tl.int32) & 0x7F) == 0x7F) | (value != value)
        bf16 = tl.where(is_nan, CANONICAL_NAN, bf16)
    tl.store(out + offsets, bf16, mask=mask)


@triton.jit
def _dequant_one(
    weight, scale, out, rows, cols,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, TILE_ROWS: tl.constexpr, NATIVE: tl.constexpr, WIDE: tl.constexpr,
    LOCAL: tl.constexpr, EARLY_SCALE: tl.constexpr,
):
    _dequant_tile(
        weight, scale, out, rows, cols, tl.program_id(0), tl.program_id(1),
        BLOCK_ROWS, BLOCK_COLS, TILE_ROWS, NATIVE, WIDE, LOCAL, EARLY_SCALE,
    )


@triton.jit
def _dequant_many(
    weight_base,  # int8*: the first weight; every weight is addressed relative to it
    scale_base,  # float32*: the first scale_inv
    out_base,  # int16*: the first output
    offsets,  # int64[3, T]: element offsets of each weight, scale_inv and output from the bases
    shapes,  # int64[T, 2]: rows, cols
    program_tensor,  # int32[programs]: the tensor each program works on
    program_first,  # int32[T]: each tensor's first program
    num_tensors,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, TILE_ROWS: tl.constexpr,
    NATIVE: tl.constexpr, ALIGNED: tl.constexpr, WIDE: tl.constexpr, LOCAL: tl.constexpr, EARLY_SCALE: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(program_tensor + pid)
    local = pid - tl.load(program_first + t)
    rows = tl.load(shapes + 2 * t)
    cols = tl.load(shapes + 2 * t + 1).to(tl.int32)
    weight_offset = tl.load(offsets + t)
    out_offset = tl.load(offsets + 2 * num_tensors + t)
    if ALIGNED:
        # base + offset keeps the alignment facts that 16-byte vector loads and stores need
        weight_offset = tl.multiple_of(weight_offset, 16)
        out_offset = tl.multiple_of(out_offset, 8)
        cols = tl.multiple_of(cols, 16)
    col_tiles = (cols + BLOCK_COLS - 1) // BLOCK_COLS
    _dequant_tile(
        weight_base + weight_offset, scale_base + tl.load(offsets + num_tensors + t), out_base + out_offset,
        rows, cols, local // col_tiles, local % col_tiles,
        BLOCK_ROWS, BLOCK_COLS, TILE_ROWS, NATIVE, WIDE, LOCAL, EARLY_SCALE,
    )


def _tile_rows(block_rows: int, tile_rows: int) -> int:
    tile_rows = min(tile_rows, block_rows)
    return tile_rows if block_rows % tile_rows == 0 else block_rows


def _to_device(tables: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    if device.type != "cuda":
        return tables
    return [table.pin_memory().to(device, non_blocking=True) for table in tables]


def _local_fits(tile_rows: int, weights: list[torch.Tensor]) -> bool:
    """Tile-local offsets stay in 32 bits (else every element gets a full, 64-bit where needed, offset)."""
    return tile_rows * max(w.shape[1] for w in weights) < 2**31


def _sm_count(device: torch.device) -> int:
    return _cuda_facts(device.type, device.index)[0]


def native_fp8(device: torch.device) -> bool:
    """Hardware e4m3 conversion: CUDA compute capability 8.9 or newer, and not the interpreter."""
    return os.environ.get("TRITON_INTERPRET") != "1" and _cuda_facts(device.type, device.index)[1] >= (8, 9)


@functools.cache
def _cuda_facts(kind: str, index: int | None) -> tuple[int, tuple[int, int]]:
    """(multiprocessors, compute capability), asked once per device: launches stay cheap."""
    if kind != "cuda":
        return 1, (0, 0)
    device = torch.device(kind, index if index is not None else torch.cuda.current_device())
    return torch.cuda.get_device_properties(device).multi_processor_count, torch.cuda.get_device_capability(device)


def _programs(weight: torch.Tensor, block: tuple[int, int], tile_rows: int) -> tuple[int, int]:
    rows, cols = weight.shape
    return triton.cdiv(rows, tile_rows), triton.cdiv(cols, block[1])


def dequant_one_triton(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    out: torch.Tensor,
    block: tuple[int, int],
    tile_rows: int | None = None,
    num_warps: int | None = None,
    native: bool | None = None,
    local: bool = False,
    early_scale: bool = False,
) -> None:
    """One tensor, no host-side tables (CUDA-graph capturable); inputs are already validated."""
    if tile_rows is None:
        tile_rows = TILE_ROWS
        wanted = _PROGRAMS_PER_SM * _sm_count(weight.device)
        while tile_rows > _MIN_TILE_ROWS and math.prod(_programs(weight, block, tile_rows)) < wanted:
            tile_rows //= 2
    if num_warps is None:
        num_warps = 4  # measured: 4 warps beat 8 for one tensor at a time (bench/RESULTS.md)
    tile_rows = _tile_rows(block[0], tile_rows)
    rows, cols = weight.shape
    _dequant_one[_programs(weight, block, tile_rows)](
        weight.view(torch.int8), scale_inv, out.view(torch.int16), rows, cols,
        BLOCK_ROWS=block[0], BLOCK_COLS=block[1], TILE_ROWS=tile_rows,
        NATIVE=native_fp8(weight.device) if native is None else native, WIDE=weight.numel() >= 2**31,
        LOCAL=local and _local_fits(tile_rows, [weight]), EARLY_SCALE=early_scale, num_warps=num_warps,
    )


def dequant_many_triton(
    weights: list[torch.Tensor],
    scales: list[torch.Tensor],
    outs: list[torch.Tensor],
    block: tuple[int, int],
    tile_rows: int = TILE_ROWS,
    num_warps: int = NUM_WARPS,
    native: bool | None = None,
    local: bool = True,
    early_scale: bool = True,
) -> None:
    """All (weight, scale_inv, out) triples in one launch; inputs are already validated."""
    tile_rows = _tile_rows(block[0], tile_rows)
    device = weights[0].device
    counts = [math.prod(_programs(w, block, tile_rows)) for w in weights]
    first = [0]
    for count in counts[:-1]:
        first.append(first[-1] + count)
    bases = (weights[0].data_ptr(), scales[0].data_ptr(), outs[0].data_ptr())
    items = (1, 4, 2)  # bytes per element of weight, scale_inv, output
    offsets = torch.tensor(
        [[(x.data_ptr() - base) // item for x in group] for group, base, item in zip((weights, scales, outs), bases, items, strict=True)],
        dtype=torch.int64,
    )
    aligned = all(base % 16 == 0 for base in bases) and all(
        w.data_ptr() % 16 == 0 and o.data_ptr() % 16 == 0 and w.shape[1] % 16 == 0 for w, o in zip(weights, outs, strict=True)
    )
    shapes = torch.tensor([list(w.shape) for w in weights], dtype=torch.int64)
    program_tensor = torch.repeat_interleave(torch.arange(len(weights), dtype=torch.int32), torch.tensor(counts))
    program_first = torch.tensor(first, dtype=torch.int32)
    # two tables, each copied in one asynchronous transfer from pinned memory: a copy from pageable memory
    # would first wait for the GPU to go idle, so the host would build the next launch while it sits idle
    count = len(weights)
    wide_table, narrow_table = _to_device([torch.cat([offsets.flatten(), shapes.flatten()]), torch.cat([program_first, program_tensor])], device)
    _dequant_many[(sum(counts),)](
        weights[0].view(torch.int8), scales[0], outs[0].view(torch.int16),
        wide_table[: 3 * count], wide_table[3 * count :], narrow_table[count:], narrow_table[:count], count,
        BLOCK_ROWS=block[0], BLOCK_COLS=block[1], TILE_ROWS=tile_rows, ALIGNED=aligned,
        WIDE=any(w.numel() >= 2**31 for w in weights),
        NATIVE=native_fp8(device) if native is None else native, LOCAL=local and _local_fits(tile_rows, weights), EARLY_SCALE=early_scale,
        num_warps=num_warps,
    )
