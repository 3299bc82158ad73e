"""FP8 block quantisation: the recipe, prior scales, refusals, and the Triton kernel under the interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kernels.fp8 import (
    FP8FormatError,
    dequant_fp8_blocks,
    quant_fp8_blocks,
    quant_fp8_blocks_batched,
    scale_shape,
)

BLOCK = (128, 128)
E4M3_MAGNITUDES = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).double()  # 0 .. 448, increasing


def same_codes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def same_scales(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def per_element(grid: torch.Tensor, shape: tuple[int, int], block: tuple[int, int] = BLOCK) -> torch.Tensor:
    return grid.repeat_interleave(block[0], 0)[: shape[0]].repeat_interleave(block[1], 1)[:, : shape[1]]


def nearest_even_e4m3(values: torch.Tensor) -> torch.Tensor:
    """The definition, from the table of e4m3 values: the nearest one, ties to the even code; the sign kept."""
    x = values.double().abs()
    hi = torch.searchsorted(E4M3_MAGNITUDES, x).clamp(max=126)
    lo = (hi - 1).clamp(min=0)
    below, above = x - E4M3_MAGNITUDES[lo], E4M3_MAGNITUDES[hi] - x
    tie = torch.where(lo % 2 == 0, lo, hi)
    magnitude = torch.where(below < above, lo, torch.where(above < below, hi, tie))
    return (magnitude | (torch.signbit(values).long() << 7)).to(torch.uint8)


def rounding_cases() -> torch.Tensor:
    """float32 values within +-448 where rounding to e4m3 can go wrong, both signs.

    Every e4m3 value and every midpoint between neighbours, each with its float32 neighbours one ulp either
    side; float32 subnormals and the smallest normal; and 2**16 random bit patterns up to 448.
    """
    midpoints = (E4M3_MAGNITUDES[:-1] + E4M3_MAGNITUDES[1:]) / 2  # exact: e4m3 has 3 fraction bits
    float32_edges = torch.tensor([1, 2, 0x7FFFFF, 0x800000], dtype=torch.int32).view(torch.float32).double()
    anchors = torch.cat([E4M3_MAGNITUDES, midpoints, float32_edges]).float().view(torch.int32)
    bits = torch.cat([anchors - 1, anchors, anchors + 1, torch.randint(0, 0x43E00001, (1 << 16,), generator=torch.Generator().manual_seed(0), dtype=torch.int32)])
    values = bits[bits >= 0].view(torch.float32)
    values = values[values <= 448].unique()
    return torch.cat([values, -values])


def test_torch_e4m3_cast_rounds_to_nearest_even():
    values = rounding_cases()
    assert len(values) > 130_000  # 2 signs x (1,538 structured cases + 2**16 random, less repeats)
    assert torch.equal(values.to(torch.float8_e4m3fn).view(torch.uint8), nearest_even_e4m3(values))


def release_like(shape: tuple[int, int], top: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random e4m3 codes over all exponents up to magnitude byte `top`, which every block holds, and float32 scales.

    The scales have float32 mantissas, like amax / 448 of float32 master weights.
    """
    generator = torch.Generator().manual_seed(seed)
    magnitude = torch.randint(0, top + 1, shape, generator=generator, dtype=torch.int16)
    magnitude[:: BLOCK[0], :: BLOCK[1]] = top
    sign = torch.randint(0, 2, shape, generator=generator, dtype=torch.int16) << 7
    codes = (magnitude | sign).to(torch.uint8).view(torch.float8_e4m3fn)
    return codes, torch.exp2(torch.empty(scale_shape(shape)).uniform_(-14, -4, generator=generator))


@pytest.mark.parametrize("shape", [(576, 1024), (129, 257), (1, 1)])
def test_release_round_trip_is_bit_exact_with_prior_scales(shape):
    codes, scale_inv = release_like(shape, top=0x7E, seed=shape[0])  # every block's largest code is 448
    bf16 = dequant_fp8_blocks(codes, scale_inv)
    again, again_scale = quant_fp8_blocks(bf16, prior_scale=scale_inv)
    assert same_codes(again, codes) and same_scales(again_scale, scale_inv)
    # Without the prior the codes still come back, but amax / 448 of the bf16 block is not the release's
    # scale: bf16(448 * scale) keeps 8 bits. None of these 47 float32 scales comes back (nor 512 of 512 on
    # 2048x4096, at most 0.36% off, under the 2**-8 bound); scales that were a bf16 amax / 448 all do.
    fresh, fresh_scale = quant_fp8_blocks(bf16)
    assert same_codes(fresh, codes)
    assert not same_scales(fresh_scale, scale_inv)
    assert ((fresh_scale - scale_inv).abs() <= scale_inv * 2.0**-8).all()


def test_block_below_448_needs_the_prior_to_come_back():
    codes, scale_inv = release_like((256, 256), top=0x77, seed=1)  # every block's largest code is 240
    bf16 = dequant_fp8_blocks(codes, scale_inv)
    fresh, _ = quant_fp8_blocks(bf16)
    assert fresh.float().abs().amax() == 448 and not same_codes(fresh, codes)
    kept, kept_scale = quant_fp8_blocks(bf16, prior_scale=scale_inv)
    assert same_codes(kept, codes) and same_scales(kept_scale, scale_inv)


def test_changed_blocks_get_fresh_scales_and_the_rest_keep_the_prior():
    codes, scale_inv = release_like((300, 400), top=0x7E, seed=2)
    bf16 = dequant_fp8_blocks(codes, scale_inv)
    changed = bf16.clone()
    changed[130:140, 260:270] += (torch.randn(10, 10) * 1e-3).to(torch.bfloat16)  # block (1, 2)
    changed.view(torch.int16)[0, 0] += 1  # block (0, 0): one element, one bf16 ulp
    kept, kept_scale = quant_fp8_blocks(changed, prior_scale=scale_inv)
    fresh, fresh_scale = quant_fp8_blocks(changed)
    touched = torch.zeros(scale_inv.shape, dtype=torch.bool)
    touched[1, 2] = touched[0, 0] = True
    assert same_scales(kept_scale[touched], fresh_scale[touched])
    assert same_scales(kept_scale[~touched], scale_inv[~touched])
    elements = per_element(touched, changed.shape)
    assert same_codes(kept[elements], fresh[elements]) and same_codes(kept[~elements], codes[~elements])


def test_prior_kept_for_float32_and_float16_input_only_where_exact_in_bf16():
    codes, _ = release_like((256, 128), top=0x7E, seed=3)
    # scales from 2**-6 up: the smallest product, 2**-9 * 2**-6, still has every bf16 bit in float16
    scale_inv = torch.exp2(torch.empty(2, 1).uniform_(-6, -4, generator=torch.Generator().manual_seed(3)))
    exact = dequant_fp8_blocks(codes, scale_inv).float()
    for dtype in (torch.float32, torch.float16):
        kept, kept_scale = quant_fp8_blocks(exact.to(dtype), prior_scale=scale_inv)
        assert same_codes(kept, codes) and same_scales(kept_scale, scale_inv)
    nudged = exact.clone()
    nudged[200, 5] = nudged[200, 5].nextafter(torch.tensor(0.0))  # one float32 ulp: no longer a bf16 value
    _, nudged_scale = quant_fp8_blocks(nudged, prior_scale=scale_inv)
    assert same_scales(nudged_scale[0], scale_inv[0]) and not same_scales(nudged_scale[1], scale_inv[1])


def test_prior_that_is_not_positive_and_finite_is_never_kept():
    weight = torch.zeros(128, 512, dtype=torch.bfloat16)  # zeros dequantise from any scale
    prior = torch.tensor([[0.0, -1.0, float("inf"), float("nan")]])
    _, scale_inv = quant_fp8_blocks(weight, prior_scale=prior)
    assert (scale_inv == 1.0).all()
    _, scale_inv = quant_fp8_blocks(weight, prior_scale=torch.full((1, 4), 0.5))
    assert (scale_inv == 0.5).all()


def reference_quant(weight: torch.Tensor, block: tuple[int, int] = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """The recipe on the whole tensor at once, with float64 division rounded to float32 (the same as IEEE
    float32 division: 53 >= 2 * 24 + 2 bits, so the double rounding cannot differ) and the table rounding."""
    rows, cols = weight.shape
    grid = scale_shape((rows, cols), block)
    padded = torch.zeros(grid[0] * block[0], grid[1] * block[1], dtype=torch.float64)
    padded[:rows, :cols] = weight.double()
    amax = padded.view(grid[0], block[0], grid[1], block[1]).abs().amax(dim=(1, 3))
    scale_inv = (amax / 448).float()
    scale_inv[scale_inv == 0] = 1.0
    quotient = (weight.double() / per_element(scale_inv, (rows, cols), block).double()).float().clamp(-448, 448)
    return nearest_even_e4m3(quotient).view(torch.float8_e4m3fn), scale_inv


def realistic(shape: tuple[int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Gaussian weights with an outlier block, a block of tiny values (bf16 subnormals) and a zero block."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator) * 0.02
    weight[:64, :64] *= 1000
    weight[-64:, -64:] *= 1e-36
    weight[-30:, :30] = 0
    return weight.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(576, 1024), (129, 257), (1, 1), (300, 7)])
def test_cpu_path_matches_the_whole_tensor_reference(shape, dtype):
    weight = realistic(shape, dtype, seed=shape[0] + shape[1])
    codes, scale_inv = quant_fp8_blocks(weight)
    expected_codes, expected_scale = reference_quant(weight)
    assert same_codes(codes, expected_codes) and same_scales(scale_inv, expected_scale)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == shape


@pytest.mark.parametrize("block", [(64, 32), (100, 48)])
def test_other_block_sizes(block):
    weight = realistic((300, 200), torch.bfloat16, seed=block[0])
    codes, scale_inv = quant_fp8_blocks(weight, block)
    expected_codes, expected_scale = reference_quant(weight, block)
    assert same_codes(codes, expected_codes) and same_scales(scale_inv, expected_scale)


def test_each_element_is_within_half_an_e4m3_step():
    weight = realistic((384, 640), torch.bfloat16, seed=4)
    codes, scale_inv = quant_fp8_blocks(weight)
    exact = weight.double() / per_element(scale_inv, weight.shape).double()  # the unrounded code
    # an e4m3 step is 2**(e - 3) in the binade [2**e, 2**(e + 1)), e >= -6 (the subnormal step below)
    binade = torch.floor(torch.log2(exact.abs().clamp(min=2.0**-6)))
    half_step = torch.exp2(binade - 4)
    # the float32 quotient is rounded once before e4m3: 2**-24 of it on top
    assert ((codes.double() - exact).abs() <= half_step + exact.abs() * 2.0**-24).all()


def test_zero_blocks_and_underflowing_amax_get_scale_one():
    weight = torch.zeros(200, 300)
    weight[0, :5] = -0.0
    weight[128:, 128:256] = 1e-45  # float32 subnormal: amax / 448 is 0 in float32
    weight[128:, 256:] = torch.randn(72, 44)
    codes, scale_inv = quant_fp8_blocks(weight)
    assert scale_inv[0].tolist() == [1.0, 1.0, 1.0] and scale_inv[1, :2].tolist() == [1.0, 1.0]
    assert (codes.view(torch.uint8)[0, :5] == 0x80).all()  # the sign of zero is kept, as dequant gives it back
    assert (codes[:, :256].float() == 0).all()


def test_non_finite_weights_are_refused_with_where_and_how_many():
    weight = torch.randn(300, 200, dtype=torch.bfloat16)
    weight[299, 3] = float("inf")
    weight[130, 150] = float("nan")
    weight[131, 0] = -float("inf")
    with pytest.raises(FP8FormatError, match=r"layers\.3\.w2: 3 of 60000 values are NaN or infinite, the first \(nan\) at row 130, column 150"):
        quant_fp8_blocks(weight, name="layers.3.w2")
    with pytest.raises(FP8FormatError, match=r"^second: 1 of 20000 .* at row 99, column 3"):
        quant_fp8_blocks_batched([torch.ones(3, 3), weight[200:]], names=["first", "second"])


@pytest.mark.parametrize(
    "weight, prior, message",
    [
        (torch.zeros(4, 4, dtype=torch.float64), None, "only bfloat16, float16 and float32"),
        (torch.zeros(2, 4, 4), None, "only 2-D"),
        (torch.zeros(200, 4), torch.ones(1, 1), r"prior_scale must be float32 of shape \(2, 1\)"),
        (torch.zeros(4, 4), torch.ones(1, 1, dtype=torch.bfloat16), "got torch.bfloat16"),
    ],
)
def test_bad_inputs_are_refused(weight, prior, message):
    with pytest.raises(FP8FormatError, match=message):
        quant_fp8_blocks(weight, prior_scale=prior)


def test_batched_equals_one_by_one_and_empty_tensors():
    weights = [realistic(shape, torch.bfloat16, seed=i) for i, shape in enumerate([(130, 300), (1, 1), (0, 5), (64, 64)])]
    codes, scale_inv = release_like((130, 300), top=0x7E, seed=5)
    priors = [scale_inv, None, None, torch.ones(1, 1)]
    weights[0] = dequant_fp8_blocks(codes, scale_inv)
    batched = quant_fp8_blocks_batched(weights, prior_scales=priors)
    for weight, prior, (fp8, scale) in zip(weights, priors, batched, strict=True):
        one, one_scale = quant_fp8_blocks(weight, prior_scale=prior)
        assert same_codes(fp8, one) and same_scales(scale, one_scale)
    assert batched[2][0].shape == (0, 5) and batched[2][1].shape == (0, 1)


INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import triton
    import triton.language as tl
    from kernels.fp8 import FP8FormatError, _quant_cpu, dequant_fp8_blocks, quant_fp8_blocks, quant_fp8_blocks_batched, scale_shape
    from kernels.fp8_quant_triton import _encode_e4m3

    @triton.jit
    def encode(values, codes, count, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        value = tl.load(values + offsets, mask=offsets < count)
        tl.store(codes + offsets, _encode_e4m3(value, False), mask=offsets < count)

    cases = torch.load(sys.argv[1])
    encoded = torch.empty(cases.shape, dtype=torch.int8)
    encode[(triton.cdiv(len(cases), 8192),)](cases, encoded, len(cases), BLOCK=8192)
    torch.save(encoded, sys.argv[2])

    def realistic(shape, dtype, generator):
        weight = torch.randn(shape, generator=generator) * 0.02
        weight[:64, :64] *= 1000
        weight[-64:, -64:] *= 1e-36  # bf16 subnormals; float32 ones where the dtype is float32
        weight[-30:, :30] = 0
        return weight.to(dtype)

    generator = torch.Generator().manual_seed(0)
    shapes = [(576, 1024, torch.bfloat16), (129, 257, torch.bfloat16), (1, 1, torch.bfloat16), (300, 130, torch.float16), (129, 257, torch.float32)]
    weights = [realistic(shape[:2], shape[2], generator) for shape in shapes]
    weights.append(torch.full((40, 70), 1e-45))  # amax / 448 underflows to 0: scale 1.0
    priors = []
    for index, weight in enumerate(weights):
        codes, scale_inv = quant_fp8_blocks(weight)  # the Triton kernel: TRITON_INTERPRET=1
        # float32 mantissas, as a release's scales have: a fresh amax / 448 of the bf16 never equals them
        scale_inv = scale_inv * (1 + torch.rand(scale_inv.shape, generator=generator) * 2.0 ** -9)
        back = dequant_fp8_blocks(codes, scale_inv).to(weight.dtype)
        if back.numel() > 1:  # one block changed, the others as they were
            back[-1, -1] = back[-1, -1] * 1.5 + 0.01
        weights[index] = back
        priors.append(scale_inv)
    # the priors in one pool, the first tensor's last: the batched kernel's offsets from it are negative
    pool = torch.empty(sum(prior.numel() for prior in priors))
    end = len(pool)
    for index, prior in enumerate(priors):
        priors[index] = pool[end - prior.numel() : end].view(prior.shape).copy_(prior)
        end -= prior.numel()
    priors[2] = None
    priors[3] = priors[3] * 1.1  # codes at 1.1 times the scale mostly dequantise to other values
    blocks, bad, kept = 0, 0, 0
    batched = quant_fp8_blocks_batched(weights, prior_scales=priors)
    plain = quant_fp8_blocks_batched(weights)
    for index, (weight, prior) in enumerate(zip(weights, priors)):
        expected = {}
        for key, use in (("prior", prior), ("plain", None)):
            codes = torch.empty(weight.shape, dtype=torch.float8_e4m3fn)
            scale_inv = torch.empty(scale_shape(weight.shape), dtype=torch.float32)
            _quant_cpu(weight, use, (128, 128), "w", codes, scale_inv)
            expected[key] = codes, scale_inv
        got = {"prior": [batched[index], quant_fp8_blocks(weight, prior_scale=prior)], "plain": [plain[index], quant_fp8_blocks(weight)]}
        for key, results in got.items():
            for codes, scale_inv in results:
                bad += int((codes.view(torch.uint8) != expected[key][0].view(torch.uint8)).sum())
                bad += int((scale_inv.view(torch.int32) != expected[key][1].view(torch.int32)).sum())
        blocks += expected["prior"][1].numel()
        if prior is not None:
            kept += int((expected["prior"][1] == prior).sum())
    small = quant_fp8_blocks(weights[1], (32, 64))  # another block size, power of two for the kernel
    codes, scale_inv = torch.empty_like(small[0]), torch.empty_like(small[1])
    _quant_cpu(weights[1], None, (32, 64), "w", codes, scale_inv)
    bad += int((codes.view(torch.uint8) != small[0].view(torch.uint8)).sum()) + int((scale_inv != small[1]).sum())
    poisoned = weights[0].clone()
    poisoned[300, 17] = float("nan")
    poisoned[500, 1000] = float("inf")
    try:
        quant_fp8_blocks(poisoned, name="poisoned")
    except FP8FormatError as error:
        print(error)
    print("blocks", blocks, "kept", kept, "mismatched", bad)
    """
)


def test_triton_kernel_under_interpreter_matches_cpu_path(tmp_path):
    cases = rounding_cases()
    torch.save(cases, tmp_path / "cases.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-c", INTERPRETER_SCRIPT, str(tmp_path / "cases.pt"), str(tmp_path / "codes.pt")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # the integer encoder (sm_80 and the interpreter) against torch's cast, itself checked against the table
    assert torch.equal(torch.load(tmp_path / "codes.pt").view(torch.uint8), cases.to(torch.float8_e4m3fn).view(torch.uint8))
    # re-scaled: each tensor's changed last block, the (1, 1) one without a prior, the float16 one whose
    # priors are 1.1 times too large and the underflow block; the other 49 of 60 blocks keep their priors
    assert "blocks 60 kept 49 mismatched 0" in result.stdout
    assert "poisoned: 2 of 589824 values are NaN or infinite, the first (nan) at row 300, column 17" in result.stdout


def test_bench_help_needs_no_gpu(capsys):
    from bench.fp8_quant import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "fp8_quant.json" in capsys.readouterr().out
