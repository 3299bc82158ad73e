"""FP8 block kernels: the CPU path, the Triton kernel under the interpreter, and quantisation."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kernels.fp8 import FP8FormatError, dequant_fp8_blocks, dequant_fp8_blocks_batched, quant_fp8_blocks, scale_shape

SHAPES = [(1, 1), (1, 300), (300, 1), (576, 1024), (129, 257), (128, 128), (7, 1000), (256, 130), (3, 4096)]


def reference(weight: torch.Tensor, scale_inv: torch.Tensor, block=(128, 128)) -> torch.Tensor:
    """The definition: round_to_nearest_even(float32(w) * scale), scales broadcast per block."""
    rows, cols = weight.shape
    scales = scale_inv.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (weight.float() * scales).to(torch.bfloat16)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_path_is_bit_exact(shape):
    generator = torch.Generator().manual_seed(shape[0] * 7919 + shape[1])
    weight = torch.randn(shape, generator=generator) * 3
    fp8, scale_inv = quant_fp8_blocks(weight)
    assert scale_inv.shape == scale_shape(shape)
    out = dequant_fp8_blocks(fp8, scale_inv)
    assert out.dtype == torch.bfloat16 and out.shape == shape
    assert same_bits(out, reference(fp8, scale_inv))


@pytest.mark.parametrize("scale", [1e-3, 1.0, 300.0, 2.0**100, 1e30, 2.0**-140, 0.0, float("inf"), -float("inf"),
                                   *torch.tensor([0x7FC00000, -4194304, 0x7F800001, -1], dtype=torch.int32).view(torch.float32).tolist()])
def test_every_byte_value_and_extreme_scales(scale):
    # Scales >= 2**8 overflow the fused scale * 2**120 and take the two-step path; all must match.
    weight = torch.arange(256, dtype=torch.uint8).repeat(3, 1).view(torch.float8_e4m3fn)
    scale_inv = torch.full((1, 2), scale)
    out = dequant_fp8_blocks(weight, scale_inv)
    expected = reference(weight, scale_inv)
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(out), nan)
    assert same_bits(out[~nan], expected[~nan])
    assert (out.view(torch.int16)[nan] == 0x7FFF).all()  # the GPU's canonical NaN, on every path


def test_infinite_scale_times_zero_is_the_canonical_nan_without_nan_bytes():
    weight = torch.zeros((130, 260), dtype=torch.float8_e4m3fn)
    weight[0, 0] = 2.0
    scale_inv = torch.tensor([[float("inf"), 1.0, -float("inf")], [1.0, 2.0, 3.0]])
    out = dequant_fp8_blocks(weight, scale_inv)
    bits = out.view(torch.int16)
    assert bits[0, 0] == 0x7F80  # 2 * inf
    assert (bits[1:128, :128] == 0x7FFF).all() and (bits[:128, 256:] == 0x7FFF).all()  # 0 * inf
    assert (bits[:128, 128:256] == 0).all() and (bits[128:] == 0).all()


def test_wide_rows_use_chunks_that_do_not_divide_a_block():
    # 150001 columns: the CPU path works on 6-row chunks, clipped at every 128-row block boundary
    fp8, scale_inv = quant_fp8_blocks(torch.randn(300, 150001))
    assert same_bits(dequant_fp8_blocks(fp8, scale_inv), reference(fp8, scale_inv))


def test_non_contiguous_input_is_handled():
    fp8, scale_inv = quant_fp8_blocks(torch.randn(300, 200))
    transposed = fp8.t().contiguous().t()
    assert not transposed.is_contiguous()
    assert same_bits(dequant_fp8_blocks(transposed, scale_inv), dequant_fp8_blocks(fp8, scale_inv))


def test_batched_equals_one_by_one():
    pairs = [quant_fp8_blocks(torch.randn(shape)) for shape in SHAPES]
    batched = dequant_fp8_blocks_batched([p[0] for p in pairs], [p[1] for p in pairs])
    for (fp8, scale_inv), out in zip(pairs, batched, strict=True):
        assert same_bits(out, dequant_fp8_blocks(fp8, scale_inv))


@pytest.mark.parametrize(
    "weight, scale_inv, message",
    [
        (torch.zeros(4, 4), torch.ones(1, 1), "expected torch.float8_e4m3fn"),
        (torch.zeros(2, 4, 4).to(torch.float8_e4m3fn), torch.ones(1, 1), "only 2-D"),
        (torch.zeros(200, 4).to(torch.float8_e4m3fn), torch.ones(1, 1), r"needs \(2, 1\)"),
        (torch.zeros(4, 4).to(torch.float8_e4m3fn), torch.ones(1, 1, dtype=torch.bfloat16), "expected torch.float32"),
    ],
)
def test_bad_inputs_are_refused(weight, scale_inv, message):
    with pytest.raises(FP8FormatError, match=message):
        dequant_fp8_blocks(weight, scale_inv)


def test_quantisation_round_trip_and_zero_blocks():
    weight = torch.randn(300, 260) * 0.05
    weight[:128, :128] = 0
    fp8, scale_inv = quant_fp8_blocks(weight)
    assert scale_inv[0, 0] == 1.0
    back = dequant_fp8_blocks(fp8, scale_inv).float()
    # e4m3 keeps 3 mantissa bits: relative error <= 2**-4 of each block's scale range
    bound = (scale_inv * 448 * 2.0**-4).repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :260]
    assert ((back - weight).abs() <= bound + 1e-12).all()
    assert (fp8.float().abs().amax() <= 448).all()


INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import torch
    from kernels.fp8 import _dequant_cpu, dequant_fp8_blocks_batched, quant_fp8_blocks
    generator = torch.Generator().manual_seed(1)
    shapes = [(1, 1), (1, 300), (300, 1), (576, 1024), (129, 257), (7, 1000), (3, 4096)]
    shapes += [(int(torch.randint(1, 400, (1,), generator=generator)), int(torch.randint(1, 600, (1,), generator=generator))) for _ in range(12)]
    weights, scales = [], []
    for shape in shapes:
        fp8, scale_inv = quant_fp8_blocks(torch.randn(shape, generator=generator) * 5)
        weights.append(fp8)
        scales.append(scale_inv * torch.exp2(torch.randint(-20, 20, scale_inv.shape, generator=generator).float()))
    weights.append(torch.arange(256, dtype=torch.uint8).repeat(130, 1).view(torch.float8_e4m3fn))
    scales.append(torch.tensor([[1e30, 2.0 ** -140], [3.0, float("nan")]]))
    # NaN scales of other payloads and signs, infinities (inf * 0 is NaN): every NaN must come out 0x7FFF
    weights.append(torch.arange(256, dtype=torch.uint8).repeat(384, 1).view(torch.float8_e4m3fn))
    scales.append(torch.tensor([[0x7FC00000, -4194304], [0x7F800001, -1], [0x7F800000, -8388608]], dtype=torch.int32).view(torch.float32))
    weights.append(torch.zeros((130, 260), dtype=torch.float8_e4m3fn))  # no NaN bytes: inf * 0 alone
    scales.append(torch.tensor([[float("inf"), 1.0, -float("inf")], [1.0, 2.0, 3.0]]))
    outs = dequant_fp8_blocks_batched(weights, scales)
    outs[3] = dequant_fp8_blocks_batched(weights[3:4], scales[3:4])[0]  # the one-tensor kernel
    bad = 0
    for weight, scale_inv, out in zip(weights, scales, outs):
        expected = torch.empty_like(out)
        _dequant_cpu(weight, scale_inv, (128, 128), expected)
        bad += int((expected.view(torch.int16) != out.view(torch.int16)).sum())
    print("tensors", len(outs), "mismatched", bad)
    """
)


def test_triton_kernel_under_interpreter_matches_cpu_path():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", INTERPRETER_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tensors 22 mismatched 0" in result.stdout


@pytest.mark.slow
def test_more_than_2_pow_31_elements_cpu():
    rows, cols = 16385, 131072 + 64  # 2**31 + ~1M elements, ragged in both dimensions
    weight = torch.empty((rows, cols), dtype=torch.uint8)
    weight.view(-1)[: 1 << 20].random_(0, 120)
    weight[-1:, :] = weight.view(-1)[:cols]  # the last row starts past element 2**31
    weight = weight.view(torch.float8_e4m3fn)
    scale_inv = torch.rand(scale_shape((rows, cols))) + 0.5
    out = dequant_fp8_blocks(weight, scale_inv)
    assert same_bits(out[-1:], reference(weight[-1:], scale_inv[-1:]))
    assert same_bits(out[:1], reference(weight[:1], scale_inv[:1]))
