"""Triton kernels for FP8 (e4m3) block quantisation: one program per scale block, one tensor or many per launch.

Each program loads its block once, takes the amax, and writes the e4m3 codes and the float32 scale_inv, with
the same bits as the exact CPU path in kernels/fp8.py. Division is tl.math.div_rn, PTX div.rn.f32 (IEEE
round to nearest): a plain `/` lowers to div.full.f32, which is off by up to 2 ulp (Triton 3.9, sm_90). The
e4m3 rounding uses the GPU's own conversion on sm_89+ (cvt.rn.satfinite: round to nearest even) and an
integer encoder elsewhere: sm_80/86, and TRITON_INTERPRET=1, whose fp8 conversion is not the GPU's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.fp8_triton import REBIAS, SIGN_AND_MAGNITUDE, native_fp8

FP8_MAX = tl.constexpr(448.0)
INFINITY_BITS = tl.constexpr(0x7F800000)
# 16 warps (32 elements a thread for a 128x128 block): on an H200 (bench/RESULTS.md, 2026-12-05) 16 warps gave
# 1.17-1.40x the GB/s of 8 on every DeepSeek-V3 shape (o_proj 3044 vs 2585 GB/s) and 1.27-2.27x those of 4
NUM_WARPS = 16


@triton.jit
def _encode_e4m3(value, NATIVE: tl.constexpr):
    """e4m3 bytes (as int8) of float32 values within +-448, rounded to nearest even; the sign of zero is kept."""
    if NATIVE:
        return value.to(tl.float8e4nv).to(tl.int8, bitcast=True)
    bits = value.to(tl.int32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF) - 127
    # the implicit bit is set for float32 zeros and subnormals too: they lose all 25 bits and round to 0
    mantissa = (bits & 0x7FFFFF) | 0x800000
    # 3 of 23 fraction bits stay for a normal e4m3; below 2**-6 the subnormal step 2**-9 is fixed, so
    # one more bit goes per binade, until the value (under 2**-11) rounds to zero whatever its bits
    dropped = 20 + tl.minimum(tl.maximum(-6 - exponent, 0), 5)
    rounded = (mantissa + ((1 << (dropped - 1)) - 1) + ((mantissa >> dropped) & 1)) >> dropped
    # rounded counts the implicit bit (8..16 for a normal): added to the exponent field it carries over
    magnitude = ((tl.maximum(exponent, -6) + 6) << 3) + rounded
    return (magnitude | ((bits >> 24) & -128)).to(tl.int8)


@triton.jit
def _quantise(value, scale, NATIVE: tl.constexpr):
    scaled = tl.math.div_rn(value, scale)
    return _encode_e4m3(tl.minimum(tl.maximum(scaled, -FP8_MAX), FP8_MAX), NATIVE)


@triton.jit
def _dequantises_to(code, scale, bits, NATIVE: tl.constexpr):
    """Whether RNE_bf16(float32(code) * scale), the dequantiser's rule, widens to exactly `bits` everywhere."""
    if NATIVE:
        product = code.to(tl.float8e4nv, bitcast=True).to(tl.float32) * scale
        back = product.to(tl.bfloat16).to(tl.float32).to(tl.int32, bitcast=True)
    else:
        decoded = ((code.to(tl.int32) << 20) & SIGN_AND_MAGNITUDE).to(tl.float32, bitcast=True) * REBIAS
        product = (decoded * scale).to(tl.int32, bitcast=True)
        back = ((product + 0x7FFF + ((product >> 16) & 1)) >> 16) << 16
    return tl.max((back != bits).to(tl.int32)) == 0


@triton.jit
def _quant_block(
    weight, prior, codes, scale_out, rows, cols, block_m, block_n, use_prior,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, BF16: tl.constexpr, HAS_PRIOR: tl.constexpr,
    NATIVE: tl.constexpr, WIDE: tl.constexpr,
):
    """One scale block: codes and scale_inv; a non-finite block gets a non-finite scale_inv for the wrapper to find."""
    if WIDE:  # 2**31 elements or more: 64-bit row arithmetic
        row0 = block_m.to(tl.int64) * BLOCK_ROWS
    else:
        row0 = block_m * BLOCK_ROWS
    rr = tl.arange(0, BLOCK_ROWS)
    cc = block_n * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = ((row0 + rr) < rows)[:, None] & (cc < cols)[None, :]
    offsets = (row0 + rr)[:, None] * cols + cc[None, :]
    if BF16:
        # bf16 arrives as int16: widened by a shift, exactly, on every path (the interpreter has no bf16)
        bits = tl.load(weight + offsets, mask=mask, other=0).to(tl.int32) << 16
        value = bits.to(tl.float32, bitcast=True)
    else:
        value = tl.load(weight + offsets, mask=mask, other=0).to(tl.float32)
        bits = value.to(tl.int32, bitcast=True)
    # an integer maximum of the magnitude bits orders finite floats as floats do, and NaN and Inf
    # (>= 0x7F800000) win it, where a float maximum would skip NaN
    amax_bits = tl.max(bits & 0x7FFFFFFF)
    fresh = tl.math.div_rn(amax_bits.to(tl.float32, bitcast=True), FP8_MAX)
    fresh = tl.where(fresh == 0, 1.0, fresh)  # zero block (or a float32 amax of at most 448 * 2**-150); NaN stays NaN
    scale_index = block_m * tl.cdiv(cols, BLOCK_COLS) + block_n
    if HAS_PRIOR:
        prior_scale = tl.load(prior + scale_index)
        code = _quantise(value, prior_scale, NATIVE)
        usable = use_prior & (prior_scale > 0) & (prior_scale < float("inf")) & (amax_bits < INFINITY_BITS)
        keep = usable & _dequantises_to(code, prior_scale, bits, NATIVE)
        scale = tl.where(keep, prior_scale, fresh)
        if not keep:
            code = _quantise(value, fresh, NATIVE)
    else:
        scale = fresh
        code = _quantise(value, fresh, NATIVE)
    tl.store(codes + offsets, code, mask=mask)
    tl.store(scale_out + scale_index, scale)


@triton.jit
def _quant_one(
    weight, prior, codes, scale_out, rows, cols,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, BF16: tl.constexpr, HAS_PRIOR: tl.constexpr,
    NATIVE: tl.constexpr, WIDE: tl.constexpr,
):
    _quant_block(
        weight, prior, codes, scale_out, rows, cols, tl.program_id(0), tl.program_id(1), True,
        BLOCK_ROWS, BLOCK_COLS, BF16, HAS_PRIOR, NATIVE, WIDE,
    )


@triton.jit
def _quant_many(
    weight_base,  # int16* (bf16), float16* or float32*: the first weight; every weight is addressed relative to it
    prior_base,  # float32*: the first prior scale_inv (any float32 tensor when there is none)
    codes_base,  # int8*: the first output
    scale_base,  # float32*: the first output scale_inv
    offsets,  # int64[5, T]: element offsets of each weight, prior, codes and scale_inv from the bases; 1 if a prior
    shapes,  # int64[T, 2]: rows, cols
    program_tensor,  # int32[programs]: the tensor each program works on
    program_first,  # int32[T]: each tensor's first program
    num_tensors,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, BF16: tl.constexpr, HAS_PRIOR: tl.constexpr,
    NATIVE: tl.constexpr, ALIGNED: tl.constexpr, WIDE: tl.constexpr, WEIGHTS_PER_16_BYTES: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(program_tensor + pid)
    local = pid - tl.load(program_first + t)
    rows = tl.load(shapes + 2 * t)
    cols = tl.load(shapes + 2 * t + 1).to(tl.int32)
    weight_offset = tl.load(offsets + t)
    codes_offset = tl.load(offsets + 2 * num_tensors + t)
    if ALIGNED:
        # base + offset keeps the alignment facts that 16-byte vector loads and stores need
        weight_offset = tl.multiple_of(weight_offset, WEIGHTS_PER_16_BYTES)
        codes_offset = tl.multiple_of(codes_offset, 16)
        cols = tl.multiple_of(cols, 16)
    col_blocks = (cols + BLOCK_COLS - 1) // BLOCK_COLS
    _quant_block(
        weight_base + weight_offset, prior_base + tl.load(offsets + num_tensors + t), codes_base + codes_offset,
        scale_base + tl.load(offsets + 3 * num_tensors + t), rows, cols, local // col_blocks, local % col_blocks,
        tl.load(offsets + 4 * num_tensors + t) != 0, BLOCK_ROWS, BLOCK_COLS, BF16, HAS_PRIOR, NATIVE, WIDE,
    )


def _as_loaded(weight: torch.Tensor) -> torch.Tensor:
    return weight.view(torch.int16) if weight.dtype == torch.bfloat16 else weight


def quant_one_triton(
    weight: torch.Tensor,
    prior_scale: torch.Tensor | None,
    codes: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int],
    num_warps: int = NUM_WARPS,
    native: bool | None = None,
) -> None:
    """One tensor, no host-side tables; inputs are validated, contiguous and non-empty."""
    rows, cols = weight.shape
    _quant_one[(triton.cdiv(rows, block[0]), triton.cdiv(cols, block[1]))](
        _as_loaded(weight), scale_inv if prior_scale is None else prior_scale, codes.view(torch.int8), scale_inv,
        rows, cols, BLOCK_ROWS=block[0], BLOCK_COLS=block[1], BF16=weight.dtype == torch.bfloat16,
        HAS_PRIOR=prior_scale is not None, NATIVE=native_fp8(weight.device) if native is None else native,
        WIDE=weight.numel() >= 2**31, num_warps=num_warps,
    )


def quant_many_triton(
    weights: list[torch.Tensor],
    prior_scales: list[torch.Tensor | None],
    codes: list[torch.Tensor],
    scales: list[torch.Tensor],
    block: tuple[int, int],
    num_warps: int = NUM_WARPS,
    native: bool | None = None,
) -> None:
    """All tensors of one dtype in one launch; inputs are validated, contiguous and non-empty."""
    device = weights[0].device
    loaded = [_as_loaded(w) for w in weights]
    counts = [triton.cdiv(w.shape[0], block[0]) * triton.cdiv(w.shape[1], block[1]) for w in weights]
    first = [0]
    for count in counts[:-1]:
        first.append(first[-1] + count)
    priors = [p for p in prior_scales if p is not None]
    prior_base = priors[0] if priors else scales[0]
    bases = [loaded[0], prior_base, codes[0], scales[0]]

    # a tensor without a prior points at the first prior (or scale_inv) and is flagged off; offsets can be negative
    offsets = torch.tensor(
        [[0 if x is None else (x.data_ptr() - base.data_ptr()) // base.element_size() for x in group]
         for group, base in zip((loaded, prior_scales, codes, scales), bases, strict=True)]
        + [[int(p is not None) for p in prior_scales]],
        dtype=torch.int64,
    )
    aligned = all(base.data_ptr() % 16 == 0 for base in bases) and all(
        w.data_ptr() % 16 == 0 and c.data_ptr() % 16 == 0 and w.shape[1] % 16 == 0 for w, c in zip(weights, codes, strict=True)
    )
    shapes = torch.tensor([list(w.shape) for w in weights], dtype=torch.int64)
    program_tensor = torch.repeat_interleave(torch.arange(len(weights), dtype=torch.int32), torch.tensor(counts))
    count = len(weights)
    wide_table = torch.cat([offsets.flatten(), shapes.flatten()])
    narrow_table = torch.cat([torch.tensor(first, dtype=torch.int32), program_tensor])
    if device.type == "cuda":
        # copied from pinned memory without waiting for the GPU to go idle (as kernels/fp8_triton.py does)
        wide_table, narrow_table = (table.pin_memory().to(device, non_blocking=True) for table in (wide_table, narrow_table))
    _quant_many[(sum(counts),)](
        loaded[0], prior_base, codes[0].view(torch.int8), scales[0],
        wide_table[: 5 * count], wide_table[5 * count :], narrow_table[count:], narrow_table[:count], count,
        BLOCK_ROWS=block[0], BLOCK_COLS=block[1], BF16=weights[0].dtype == torch.bfloat16, HAS_PRIOR=bool(priors),
        NATIVE=native_fp8(device) if native is None else native, ALIGNED=aligned,
        WIDE=any(w.numel() >= 2**31 for w in weights), WEIGHTS_PER_16_BYTES=16 // weights[0].element_size(),
        num_warps=num_warps,
    )

