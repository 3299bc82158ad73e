"""FP8 (e4m3) block quantisation and dequantisation with one dispatch: Triton on GPU, exact torch on CPU.

Dequantisation: every path computes round_to_nearest_even(float32(w) * scale_inv) as bfloat16 and returns
the same bits: the CPU path decodes e4m3 with integer operations and lets torch round; the Triton kernel
uses the GPU's conversions on sm_89+ and the same integer forms elsewhere (kernels/fp8_triton.py). NaN
results are the bf16 NaN 0x7FFF on every path (the GPU's conversion gives it by itself).

Quantisation follows DeepSeek-V3's FP8 release, per block (ragged edge blocks are partial blocks):
scale_inv = amax / 448 and codes = RNE_e4m3(clamp(float32(w) / scale_inv, -448, 448)), both with IEEE
float32 division (not a multiply by the reciprocal, which rounds differently). A block whose scale comes
out 0 (all zeros) gets 1.0. With a prior scale_inv (the release's), a block keeps it whenever its codes
at that scale dequantise back to the input exactly, so release -> bf16 -> FP8 gives back the release's
bits; the CPU path here and kernels/fp8_quant_triton.py give the same bits.
"""

from __future__ import annotations

import os

import torch

FP8_MAX = 448.0
DEFAULT_BLOCK = (128, 128)
QUANTISABLE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
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
    weight: torch.Tensor,
    block: tuple[int, int] = DEFAULT_BLOCK,
    *,
    prior_scale: torch.Tensor | None = None,
    name: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 weight and float32 scale_inv of a 2-D bfloat16, float16 or float32 weight (see the module docstring).

    `prior_scale` (float32, the block grid's shape): a block keeps its prior scale_inv, and the codes
    quantised with it, iff those codes dequantise (dequant_fp8_blocks' rule, to bfloat16) to exactly the
    input values, compared as float32 bits; so a float32 or float16 input keeps it only where it is exactly
    representable in bfloat16. A prior that is not positive and finite is never kept. Other blocks get
    amax / 448. NaN or infinite weights raise FP8FormatError naming `name`, the first bad row and column.
    """
    return quant_fp8_blocks_batched([weight], block, prior_scales=[prior_scale], names=[name])[0]


def quant_fp8_blocks_batched(
    weights: list[torch.Tensor],
    block: tuple[int, int] = DEFAULT_BLOCK,
    *,
    prior_scales: list[torch.Tensor | None] | None = None,
    names: list[str] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Quantise many tensors at once (one kernel launch per input dtype on GPU); same bits as one at a time.

    On the GPU the call waits once for the kernels: the finiteness check reads every scale_inv back.
    """
    if prior_scales is None:
        prior_scales = [None] * len(weights)
    if names is None:
        names = [f"weights[{i}]" for i in range(len(weights))]
    if not len(weights) == len(prior_scales) == len(names):
        raise FP8FormatError(f"{len(weights)} weights but {len(prior_scales)} prior scales and {len(names)} names")
    if not weights:
        return []
    for weight, prior_scale, name in zip(weights, prior_scales, names, strict=True):
        _check_quant_input(weight, prior_scale, block, name)
    device = weights[0].device
    if any(w.device != device for w in weights):
        raise FP8FormatError(f"weights are on several devices ({sorted({str(w.device) for w in weights})}); quantise each device's separately")
    weights = [w.contiguous() for w in weights]
    prior_scales = [None if p is None else p.contiguous() for p in prior_scales]
    codes = [torch.empty(w.shape, dtype=torch.float8_e4m3fn, device=device) for w in weights]
    scales = [torch.empty(scale_shape(tuple(w.shape), block), dtype=torch.float32, device=device) for w in weights]
    if _use_triton(weights[0]) and _triton_block_ok(block):
        _quant_triton(weights, prior_scales, codes, scales, block)
        _raise_for_non_finite(weights, scales, names, block)
    elif weights[0].is_cuda:
        raise FP8FormatError(f"block {block} is not a power of two in both dimensions; the GPU kernel needs that")
    else:
        for weight, prior_scale, name, fp8, scale_inv in zip(weights, prior_scales, names, codes, scales, strict=True):
            _quant_cpu(weight, prior_scale, block, name, fp8, scale_inv)
    return list(zip(codes, scales, strict=True))


def _check_quant_input(weight: torch.Tensor, prior_scale: torch.Tensor | None, block: tuple[int, int], name: str) -> None:
    if weight.dtype not in QUANTISABLE_DTYPES:
        raise FP8FormatError(f"{name}: dtype is {weight.dtype}; only bfloat16, float16 and float32 weights are quantised")
    if weight.dim() != 2:
        raise FP8FormatError(f"{name}: only 2-D weights are block-quantised, got shape {tuple(weight.shape)}")
    if prior_scale is None:
        return
    expected = scale_shape(tuple(weight.shape), block)
    if prior_scale.dtype != torch.float32 or tuple(prior_scale.shape) != expected or prior_scale.device != weight.device:
        raise FP8FormatError(
            f"{name}: prior_scale must be float32 of shape {expected} on {weight.device} (the block grid of a "
            f"{tuple(weight.shape)} weight); got {prior_scale.dtype} {tuple(prior_scale.shape)} on {prior_scale.device}"
        )


def _quant_triton(
    weights: list[torch.Tensor],
    prior_scales: list[torch.Tensor | None],
    codes: list[torch.Tensor],
    scales: list[torch.Tensor],
    block: tuple[int, int],
) -> None:
    from kernels.fp8_quant_triton import quant_many_triton, quant_one_triton

    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, weight in enumerate(weights):
        if weight.numel():
            by_dtype.setdefault(weight.dtype, []).append(i)
    for group in by_dtype.values():
        if len(group) == 1:
            i = group[0]
            quant_one_triton(weights[i], prior_scales[i], codes[i], scales[i], block)
        else:
            quant_many_triton(
                [weights[i] for i in group], [prior_scales[i] for i in group], [codes[i] for i in group], [scales[i] for i in group], block
            )


def _raise_for_non_finite(weights: list[torch.Tensor], scales: list[torch.Tensor], names: list[str], block: tuple[int, int]) -> None:
    """The kernels give a block holding NaN or Inf a non-finite scale_inv: one check of all scales, then a search."""
    if bool(torch.isfinite(torch.cat([s.view(-1) for s in scales])).all()):
        return
    for weight, scale_inv, name in zip(weights, scales, names, strict=True):
        bad_rows = (~torch.isfinite(scale_inv)).any(dim=1).nonzero()
        if len(bad_rows):
            start = int(bad_rows[0]) * block[0]
            raise _non_finite_error(weight, name, start, start + block[0])


def _non_finite_error(weight: torch.Tensor, name: str, start: int, stop: int) -> FP8FormatError:
    """The error for a weight with NaN or Inf, the first of which lies in rows start:stop."""
    count = int((~torch.isfinite(weight)).sum())
    row, col = (int(i) for i in (~torch.isfinite(weight[start:stop])).nonzero()[0])
    value = float(weight[start + row, col])
    return FP8FormatError(
        f"{name}: {count} of {weight.numel()} values are NaN or infinite, the first ({value}) at row {start + row}, "
        f"column {col}; FP8 block scales need finite weights, so fix the source tensor before quantising"
    )


def _quant_cpu(
    weight: torch.Tensor,
    prior_scale: torch.Tensor | None,
    block: tuple[int, int],
    name: str,
    codes: torch.Tensor,
    scale_inv: torch.Tensor,
) -> None:
    """Vectorised CPU path, one block row at a time (float32 buffers of one block row, not of the tensor)."""
    rows, cols = weight.shape
    if weight.numel() == 0:
        return
    block_rows, block_cols = block
    grid_cols = scale_inv.shape[1]
    # zero columns pad the ragged last block: they leave its amax alone and are cut off the codes
    padded = torch.zeros((min(block_rows, rows), grid_cols * block_cols), dtype=torch.float32)
    scaled = torch.empty_like(padded)
    back = None if prior_scale is None else torch.empty(padded.shape, dtype=torch.bfloat16)
    for block_row in range(scale_inv.shape[0]):
        start = block_row * block_rows
        stop = min(start + block_rows, rows)
        values = padded[: stop - start]
        values[:, :cols].copy_(weight[start:stop])
        tiles = values.view(stop - start, grid_cols, block_cols)
        # torch's max and min propagate NaN; two reductions cost less than an abs() copy and one
        amax = torch.maximum(tiles.amax(dim=2).amax(dim=0), tiles.amin(dim=2).amin(dim=0).neg())
        if not bool(torch.isfinite(amax).all()):
            raise _non_finite_error(weight, name, start, stop)
        fresh = amax / FP8_MAX
        fresh = torch.where(fresh == 0, torch.ones_like(fresh), fresh)  # zeros, or a float32 amax of at most 448 * 2**-150
        buffer = scaled[: stop - start].view_as(tiles)
        if prior_scale is None:
            scale_row = fresh
            block_codes = _quantise_cpu(tiles, fresh, buffer)
        else:
            prior_row = prior_scale[block_row : block_row + 1]
            block_codes = _quantise_cpu(tiles, prior_row[0], buffer)
            _dequant_cpu(block_codes.view(values.shape), prior_row, block, back[: stop - start])
            differs = torch.ne(back[: stop - start].float().view(torch.int32), values.view(torch.int32))
            differs = differs.view(torch.uint8).view_as(tiles).amax(dim=2).amax(dim=0)
            keep = (differs == 0) & (prior_row[0] > 0) & torch.isfinite(prior_row[0])
            scale_row = torch.where(keep, prior_row[0], fresh)
            if not bool(keep.all()):
                fresh_codes = _quantise_cpu(tiles, fresh, buffer)
                block_codes = torch.where(keep[:, None], block_codes.view(torch.uint8), fresh_codes.view(torch.uint8))
                block_codes = block_codes.view(torch.float8_e4m3fn)
        codes[start:stop] = block_codes.view(values.shape)[:, :cols]
        scale_inv[block_row] = scale_row


def _quantise_cpu(tiles: torch.Tensor, scale_row: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """RNE e4m3 of clamp(tiles / scale, +-448); torch's division is IEEE and its e4m3 cast rounds to nearest even."""
    return torch.div(tiles, scale_row[:, None], out=buffer).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
