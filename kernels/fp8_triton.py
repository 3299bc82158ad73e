"""Triton kernels for FP8 (e4m3) block dequantisation: one tensor, or many tensors in one launch.

e4m3 is decoded from its bits and bf16 is rounded with integer operations, so the kernels need no
native FP8 conversion (they run on sm_80 and newer) and give the same bits under TRITON_INTERPRET=1,
whose own float32 -> bfloat16 cast truncates instead of rounding to nearest even.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# e4m3 bits shifted into a float32 carry the exponent biased by 7 instead of 127: multiplying by
# 2**120 re-biases exactly (normal and subnormal values alike).
REBIAS = 2.0**120
TILE_ROWS = 32
NUM_WARPS = 4


@triton.jit
def _dequant_tile(weight, scale, out, rows, cols, tile_m, tile_n, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, TILE_ROWS: tl.constexpr):
    r = tile_m.to(tl.int64) * TILE_ROWS + tl.arange(0, TILE_ROWS).to(tl.int64)
    c = tile_n.to(tl.int64) * BLOCK_COLS + tl.arange(0, BLOCK_COLS).to(tl.int64)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    offsets = r[:, None] * cols + c[None, :]

    fp8 = tl.load(weight + offsets, mask=mask, other=0).to(tl.int32)  # sign-extended byte
    bits = (fp8 << 20) & -2014314496  # 0x87F00000: sign, 4 exponent and 3 mantissa bits in place
    value = bits.to(tl.float32, bitcast=True) * REBIAS
    scale_cols = (cols + BLOCK_COLS - 1) // BLOCK_COLS
    scale_row = (tile_m.to(tl.int64) * TILE_ROWS) // BLOCK_ROWS
    value = value * tl.load(scale + scale_row * scale_cols + tile_n)

    rounded = value.to(tl.int32, bitcast=True)
    rounded = rounded + 0x7FFF + ((rounded >> 16) & 1)
    bf16 = (rounded >> 16).to(tl.int16)
    is_nan = ((fp8 & 0x7F) == 0x7F) | (value != value)
    tl.store(out + offsets, tl.where(is_nan, 0x7FC0, bf16), mask=mask)


@triton.jit
def _dequant_one(weight, scale, out, rows, cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, TILE_ROWS: tl.constexpr):
    _dequant_tile(weight, scale, out, rows, cols, tl.program_id(0), tl.program_id(1), BLOCK_ROWS, BLOCK_COLS, TILE_ROWS)


@triton.jit
def _dequant_many(
    weight_ptrs,  # int64[T]: address of each FP8 weight (contiguous, row-major)
    scale_ptrs,  # int64[T]: address of each float32 scale_inv
    out_ptrs,  # int64[T]: address of each bf16 output
    shapes,  # int64[T, 2]: rows, cols
    tile_first,  # int64[T]: index of each tensor's first tile
    num_tensors,
    SEARCH_STEPS: tl.constexpr,  # ceil(log2(T)) + 1
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    TILE_ROWS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    low = pid * 0
    high = low + num_tensors - 1
    for _ in tl.static_range(SEARCH_STEPS):  # the last tensor whose first tile is <= pid
        middle = (low + high + 1) // 2
        ahead = tl.load(tile_first + middle) <= pid
        low = tl.where(ahead, middle, low)
        high = tl.where(ahead, high, middle - 1)
    t = low
    rows = tl.load(shapes + 2 * t)
    cols = tl.load(shapes + 2 * t + 1)
    local = pid - tl.load(tile_first + t)
    tiles_per_row = (cols + BLOCK_COLS - 1) // BLOCK_COLS
    weight = tl.load(weight_ptrs + t).to(tl.pointer_type(tl.int8))
    scale = tl.load(scale_ptrs + t).to(tl.pointer_type(tl.float32))
    out = tl.load(out_ptrs + t).to(tl.pointer_type(tl.int16))
    _dequant_tile(weight, scale, out, rows, cols, local // tiles_per_row, local % tiles_per_row, BLOCK_ROWS, BLOCK_COLS, TILE_ROWS)


def _tile_rows(block_rows: int, tile_rows: int) -> int:
    tile_rows = min(tile_rows, block_rows)
    return tile_rows if block_rows % tile_rows == 0 else block_rows


def dequant_one_triton(
    weight: torch.Tensor, scale_inv: torch.Tensor, out: torch.Tensor, block: tuple[int, int], tile_rows: int = TILE_ROWS, num_warps: int = NUM_WARPS
) -> None:
    """One tensor, no host-side tables (CUDA-graph capturable); inputs are already validated."""
    tile_rows = _tile_rows(block[0], tile_rows)
    rows, cols = weight.shape
    grid = (triton.cdiv(rows, tile_rows), triton.cdiv(cols, block[1]))
    _dequant_one[grid](
        weight.view(torch.int8), scale_inv, out.view(torch.int16), rows, cols,
        BLOCK_ROWS=block[0], BLOCK_COLS=block[1], TILE_ROWS=tile_rows, num_warps=num_warps,
    )


def dequant_many_triton(
    weights: list[torch.Tensor],
    scales: list[torch.Tensor],
    outs: list[torch.Tensor],
    block: tuple[int, int],
    tile_rows: int = TILE_ROWS,
    num_warps: int = NUM_WARPS,
) -> None:
    """All (weight, scale_inv, out) triples in one launch; inputs are already validated."""
    tile_rows = _tile_rows(block[0], tile_rows)
    device = weights[0].device
    tile_counts = [triton.cdiv(w.shape[0], tile_rows) * triton.cdiv(w.shape[1], block[1]) for w in weights]
    first = [0]
    for count in tile_counts[:-1]:
        first.append(first[-1] + count)
    table = torch.tensor(
        [[w.data_ptr() for w in weights], [s.data_ptr() for s in scales], [o.data_ptr() for o in outs], first],
        dtype=torch.int64,
    )
    shapes = torch.tensor([list(w.shape) for w in weights], dtype=torch.int64)
    table, shapes = table.to(device, non_blocking=True), shapes.to(device, non_blocking=True)
    _dequant_many[(sum(tile_counts),)](
        table[0], table[1], table[2], shapes, table[3], len(weights),
        SEARCH_STEPS=max(1, (len(weights) - 1).bit_length() + 1),
        BLOCK_ROWS=block[0], BLOCK_COLS=block[1], TILE_ROWS=tile_rows, num_warps=num_warps,
    )
