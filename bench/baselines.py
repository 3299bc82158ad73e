"""Baselines we measure against: a classic 128x128-tile Triton dequant kernel and plain PyTorch."""

from __future__ import annotations

import torch


def dequant_plain_torch(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = 128) -> torch.Tensor:
    """The obvious PyTorch version: expand the scales to full size, multiply, cast."""
    rows, cols = weight.shape
    scales = scale_inv.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return (weight.float() * scales).to(torch.bfloat16)


def dequant_tile_reference(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: int = 128, out: torch.Tensor | None = None
) -> torch.Tensor:
    """One program per 128x128 scale block with the GPU's native e4m3 conversion (needs sm_89+)."""
    import triton

    if out is None:
        out = torch.empty(weight.shape, dtype=torch.bfloat16, device=weight.device)
    rows, cols = weight.shape
    _tile_kernel()[(triton.cdiv(rows, block), triton.cdiv(cols, block))](weight, scale_inv, out, rows, cols, BLOCK=block)
    return out


_KERNEL = None


def _tile_kernel():
    global _KERNEL
    if _KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def tile_dequant(w, s, y, rows, cols, BLOCK: tl.constexpr):
            block_m = tl.program_id(0)
            block_n = tl.program_id(1)
            r = block_m * BLOCK + tl.arange(0, BLOCK)
            c = block_n * BLOCK + tl.arange(0, BLOCK)
            mask = (r[:, None] < rows) & (c[None, :] < cols)
            offsets = r[:, None] * cols + c[None, :]
            value = tl.load(w + offsets, mask=mask).to(tl.float32)
            factor = tl.load(s + block_m * tl.cdiv(cols, BLOCK) + block_n)
            tl.store(y + offsets, value * factor, mask=mask)

        _KERNEL = tile_dequant
    return _KERNEL
