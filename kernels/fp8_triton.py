"""Triton kernel for FP8 (e4m3) 128x128 block dequantisation of many tensors in one launch.

e4m3 is decoded from its bits and bf16 is rounded with integer operations, so the kernel needs no
native FP8 conversion (it runs on sm_80 and newer) and gives the same bits under TRITON_INTERPRET=1,
whose own float32 -> bfloat16 cast truncates instead of rounding to nearest even.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# e4m3 bits shifted into a float32 carry the exponent biased by 7 instead of 127: multiplying by
# 2**120 re-biases exactly (normal and subnormal values alike).
REBIAS = 2.0**120


@triton.jit
def _dequant_tiles(
    weight_ptrs,  # int64[T]: address of each FP8 weight (contiguous, row-major)
    scale_ptrs,  # int64[T]: address of each float32 scale_inv
    out_ptrs,  # int64[T]: address of each bf16 output
    shapes,  # int64[T, 2]: rows, cols
    tile_tensor,  # int32[tiles]: which tensor a tile belongs to
    tile_first,  # int32[T]: first tile index of each tensor
    BLOCK_ROWS: tl.constexpr,  # scale block height
    BLOCK_COLS: tl.constexpr,  # scale block width (= tile width)
    TILE_ROWS: tl.constexpr,  # rows per program, divides BLOCK_ROWS
):
    pid = tl.program_id(0)
    t = tl.load(tile_tensor + pid)
    local = pid - tl.load(tile_first + t)
    rows = tl.load(shapes + 2 * t)
    cols = tl.load(shapes + 2 * t + 1)
    tiles_per_row = (cols + BLOCK_COLS - 1) // BLOCK_COLS
    tile_m = local // tiles_per_row
    tile_n = local % tiles_per_row

    weight = tl.load(weight_ptrs + t).to(tl.pointer_type(tl.int8))
    scale = tl.load(scale_ptrs + t).to(tl.pointer_type(tl.float32))
    out = tl.load(out_ptrs + t).to(tl.pointer_type(tl.int16))

    r = tile_m.to(tl.int64) * TILE_ROWS + tl.arange(0, TILE_ROWS).to(tl.int64)
    c = tile_n.to(tl.int64) * BLOCK_COLS + tl.arange(0, BLOCK_COLS).to(tl.int64)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    offsets = r[:, None] * cols + c[None, :]

    fp8 = tl.load(weight + offsets, mask=mask, other=0).to(tl.int32)  # sign-extended
    bits = (fp8 << 20) & -2014314496  # 0x87F00000: sign, 4 exponent and 3 mantissa bits in place
    value = bits.to(tl.float32, bitcast=True) * REBIAS
    is_nan = (fp8 & 0x7F) == 0x7F

    scale_cols = (cols + BLOCK_COLS - 1) // BLOCK_COLS
    scale_row = (tile_m.to(tl.int64) * TILE_ROWS) // BLOCK_ROWS
    value = value * tl.load(scale + scale_row * scale_cols + tile_n)

    rounded = value.to(tl.int32, bitcast=True)
    rounded = rounded + 0x7FFF + ((rounded >> 16) & 1)
    bf16 = (rounded >> 16).to(tl.int16)
    bf16 = tl.where(is_nan | (value != value), 0x7FC0, bf16)
    tl.store(out + offsets, bf16, mask=mask)


def dequant_batched_triton(
    weights: list[torch.Tensor],
    scales: list[torch.Tensor],
    outs: list[torch.Tensor],
    block: tuple[int, int],
    tile_rows: int = 32,
) -> None:
    """Launch one kernel for all (weight, scale_inv, out) triples; inputs are already validated."""
    block_rows, block_cols = block
    tile_rows = min(tile_rows, block_rows)
    if block_rows % tile_rows:
        tile_rows = block_rows
    device = weights[0].device
    tile_counts = [triton.cdiv(w.shape[0], tile_rows) * triton.cdiv(w.shape[1], block_cols) for w in weights]
    first = torch.tensor([0, *tile_counts[:-1]], dtype=torch.int64).cumsum(0).to(torch.int32)
    tile_tensor = torch.repeat_interleave(torch.arange(len(weights), dtype=torch.int32), torch.tensor(tile_counts))

    def addresses(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.tensor([x.data_ptr() for x in tensors], dtype=torch.int64, device=device)

    shapes = torch.tensor([list(w.shape) for w in weights], dtype=torch.int64, device=device)
    _dequant_tiles[(sum(tile_counts),)](
        addresses(weights),
        addresses(scales),
        addresses(outs),
        shapes,
        tile_tensor.to(device),
        first.to(device),
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
        TILE_ROWS=tile_rows,
    )
