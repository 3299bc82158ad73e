"""FP8 (e4m3) block quantisation and dequantisation with one dispatch: Triton on GPU, exact torch on CPU.

Every path computes round_to_nearest_even(float32(w) * scale_inv) as bfloat16 and returns the same
bits: the CPU path decodes e4m3 with integer operations and lets torch round; the Triton kernel uses
the GPU's conversions on sm_89+ and the same integer forms elsewhere (kernels/fp8_triton.py). NaN
results are the bf16 NaN 0x7FFF on every path (the GPU's conversion gives it by itself).
"""

from __future__ import annotations

import os

import torch

FP8_MAX = 448.0
DEFAULT_BLOCK = (128, 128)
_REBIAS = 2.0**120
_SIGN_AND_MAGNITUDE = -2014314496  # 0x87F00000 as int32
_CANONICAL_NAN = 0x7FFF  # the GPU's canonical bf16 NaN; the CPU path rewrites its NaNs to it
_CPU_CHUNK_ELEMENTS = 1 << 20


class FP8FormatError(ValueError):
    """A weight/scale pair that cannot be dequantised; the message says which property is wrong."""


def scale_shape(shape: tuple[int, ...], block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[int, int]:
    """Shape of the scale_inv that goes with a weight of `shape`: ceil(M/bm) x ceil(N/bn)."""
    rows, cols = shape
    return (-(-rows // block[0]), -(-cols // block[1]))


def check_pair(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> None:
    """Raise FP8FormatError unless `weight` is 2-D e4m3 and `scale_inv` float32 of the block grid's shape."""
    if weight.dtype != torch.float8_e4m3fn:
        raise FP8FormatError(f"weight dtype is {weight.dtype}, expected torch.float8_e4m3fn")
    if weight.dim() != 2:
        raise FP8FormatError(f"FP8 weight has {weight.dim()} dimensions {tuple(weight.shape)}; only 2-D block-quantised weights are supported")
    if scale_inv.dtype != torch.float32:
        raise FP8FormatError(f"scale_inv dtype is {scale_inv.dtype}, expected torch.float32")
    expected = scale_shape(tuple(weight.shape), block)
    if tuple(scale_inv.shape) != expected:
        raise FP8FormatError(
            f"scale_inv has shape {tuple(scale_inv.shape)} but a {tuple(weight.shape)} weight with "
            f"{block[0]}x{block[1]} blocks needs {expected}"
        )
    if weight.device != scale_inv.device:
        raise FP8FormatError(f"weight is on {weight.device} but scale_inv on {scale_inv.device}")


def _use_triton(weight: torch.Tensor) -> bool:
    return weight.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _triton_block_ok(block: tuple[int, int]) -> bool:
    return all(size > 0 and size & (size - 1) == 0 for size in block)


def dequant_fp8_blocks(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = DEFAULT_BLOCK,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """BF16 weight from an e4m3 weight and its per-block float32 scale_inv (ragged edges allowed).

    `out`, if given, receives the result (contiguous bfloat16 of the weight's shape, same device).
    """
    return dequant_fp8_blocks_batched([weight], [scale_inv], block, None if out is None else [out])[0]


def _check_out(weight: torch.Tensor, out: torch.Tensor) -> None:
    if out.dtype != torch.bfloat16 or out.shape != weight.shape or out.device != weight.device or not out.is_contiguous():
        raise FP8FormatError(
            f"out must be a contiguous bfloat16 tensor of shape {tuple(weight.shape)} on {weight.device}; "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}{'' if out.is_contiguous() else ', not contiguous'}"
        )


def dequant_fp8_blocks_batched(
    weights: list[torch.Tensor],
    scales: list[torch.Tensor],
    block: tuple[int, int] = DEFAULT_BLOCK,
    outs: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Dequantise many tensors at once (one kernel launch on GPU); same bits as one at a time."""
    if len(weights) != len(scales) or (outs is not None and len(outs) != len(weights)):
        raise FP8FormatError(f"{len(weights)} weights but {len(scales)} scales" + ("" if outs is None else f" and {len(outs)} outs"))
    if not weights:
        return []
    for weight, scale_inv in zip(weights, scales, strict=True):
        check_pair(weight, scale_inv, block)
    weights = [w.contiguous() for w in weights]
    scales = [s.contiguous() for s in scales]
    if outs is None:
        outs = [torch.empty(w.shape, dtype=torch.bfloat16, device=w.device) for w in weights]
    for weight, out in zip(weights, outs, strict=True):
        _check_out(weight, out)
    triton_ok = _triton_block_ok(block)
    if _use_triton(weights[0]) and triton_ok and all(w.device == weights[0].device for w in weights):
        from kernels.fp8_triton import dequant_many_triton, dequant_one_triton

        nonempty = [i for i, w in enumerate(weights) if w.numel()]
        if len(nonempty) == 1:
            dequant_one_triton(weights[nonempty[0]], scales[nonempty[0]], outs[nonempty[0]], block)
        elif nonempty:
            dequant_many_triton(
                [weights[i] for i in nonempty], [scales[i] for i in nonempty], [outs[i] for i in nonempty], block
            )
        return outs
    if weights[0].is_cuda:
        raise FP8FormatError(f"block {block} is not a power of two in both dimensions; the GPU kernel needs that")
    for weight, scale_inv, out in zip(weights, scales, outs, strict=True):
        _dequant_cpu(weight, scale_inv, block, out)
    return outs


def _dequant_cpu(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], out: torch.Tensor) -> None:
    """Vectorised CPU path over row chunks that stay in cache; no per-block Python loop."""
    rows, cols = weight.shape
    if weight.numel() == 0:
        return
    block_rows, block_cols = block
    full_col_blocks = cols // block_cols
    full_cols = full_col_blocks * block_cols
    # One multiply by scale * 2**120 equals the two exact steps unless that product overflows.
    combined = scale_inv * _REBIAS
    fused = bool((torch.isfinite(combined) | ~torch.isfinite(scale_inv)).all())
    signed = weight.view(torch.int8)
    # NaN results need their bits rewritten: from NaN bytes (0x7F, 0xFF: the int8 and uint8 maxima, found by
    # two fast reductions instead of comparing every chunk) or from NaN and infinite scales (inf * 0)
    may_give_nan = (
        bool((~torch.isfinite(scale_inv)).any())
        or bool(signed.max() == 127)
        or bool(weight.view(torch.uint8).max() == 255)
    )
    chunk_rows = max(1, min(block_rows, _CPU_CHUNK_ELEMENTS // max(cols, 1)))
    buffer = torch.empty((chunk_rows, cols), dtype=torch.int32)
    start = 0
    while start < rows:
        # a chunk never crosses a block row, so one scale row serves it
        stop = min(start + chunk_rows, rows, (start // block_rows + 1) * block_rows)
        count = stop - start
        raw = signed[start:stop]
        bits = buffer[:count]
        bits.copy_(raw)
        bits.bitwise_left_shift_(20).bitwise_and_(_SIGN_AND_MAGNITUDE)
        values = bits.view(torch.float32)
        scale_row = scale_inv[start // block_rows] if not fused else combined[start // block_rows]
        if not fused:
            values.mul_(_REBIAS)
        if full_col_blocks:
            values[:, :full_cols].view(count, full_col_blocks, block_cols).mul_(scale_row[:full_col_blocks, None])
        if full_cols < cols:
            values[:, full_cols:].mul_(scale_row[full_col_blocks])
        target = out[start:stop]
        target.copy_(values)
        if may_give_nan:
            as_int = target.view(torch.int16)
            as_int[(raw == 127) | (raw == -1) | torch.isnan(target)] = _CANONICAL_NAN
        start = stop


def quant_fp8_blocks(
    weight: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 weight and float32 scale_inv (block amax / 448; ragged blocks zero-padded first).

    An all-zero block gets scale_inv 1.0. The inverse of dequant_fp8_blocks up to FP8 rounding.
    """
    if weight.dim() != 2:
        raise FP8FormatError(f"only 2-D weights are block-quantised, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    grid_rows, grid_cols = scale_shape((rows, cols), block)
    padded = torch.zeros((grid_rows * block[0], grid_cols * block[1]), dtype=torch.float32, device=weight.device)
    padded[:rows, :cols] = weight.float()
    tiles = padded.view(grid_rows, block[0], grid_cols, block[1])
    amax = tiles.abs().amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    quantised = (tiles / scale_inv[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX)
    fp8 = quantised.view_as(padded)[:rows, :cols].to(torch.float8_e4m3fn).contiguous()
    return fp8, scale_inv.contiguous()


def quant_fp8_blocks_batched(weights, block=DEFAULT_BLOCK, *, prior_scales=None, names=None):  # placeholder until the kernel lands
    return [quant_fp8_blocks(weight, block) for weight in weights]
