"""GPU benchmark of the FP8 block quantiser: exactness against the CPU path, per-shape and whole-batch throughput.

    python -m bench.fp8_quant [--out DIR] [--rounds N]

Bytes moved = bf16 read + e4m3 written + float32 scales; GB/s against a device-to-device copy of the same
bytes. Inputs rotate over enough buffers (at least 3, and 256 MB moved per pass) that no timing runs out
of L2. Exit status 1 if any GPU bit differs from the CPU path's (or the conversions from each other).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
import triton.testing

from bench.fp8_kernels import DEEPSEEK_SHAPES
from kernels import fp8_quant_triton
from kernels.fp8 import (
    FP8FormatError,
    _quant_cpu,
    dequant_fp8_blocks,
    quant_fp8_blocks,
    quant_fp8_blocks_batched,
    scale_shape,
)
from kernels.fp8_quant_triton import _encode_e4m3

BLOCK = (128, 128)
ROTATE_BYTES = 256 * 1024**2
# the one-tensor kernel's settings beside the default (8 warps, the GPU's e4m3 conversion)
VARIANTS = {"w4": {"num_warps": 4}, "w8": {"num_warps": 8}, "integer encode (sm_80 path)": {"native": False}}


def realistic(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """normal * 0.02 bf16 weights with a block of outliers, one of tiny values (bf16 subnormals), one of zeros."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    weight = torch.randn(shape, generator=generator, device="cuda") * 0.02
    weight[:128, :128] *= 1000
    weight[:4, :4] = 60.0  # one block's amax far above the rest of it
    weight[-128:, :128] *= 1e-36
    weight[-128:, -128:] = 0
    return weight.to(torch.bfloat16)


def release_like(weight: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A released pair from `weight`: its codes, and its scales given float32 mantissas (as fp32 amax / 448 has)."""
    codes, scale_inv = quant_fp8_blocks(weight)
    generator = torch.Generator(device="cuda").manual_seed(seed)
    return codes, scale_inv * (1 + torch.rand(scale_inv.shape, generator=generator, device="cuda") * 2.0**-9)


def cpu_quant(weight: torch.Tensor, prior_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    weight = weight.cpu()
    codes = torch.empty(weight.shape, dtype=torch.float8_e4m3fn)
    scale_inv = torch.empty(scale_shape(tuple(weight.shape), BLOCK), dtype=torch.float32)
    _quant_cpu(weight, None if prior_scale is None else prior_scale.cpu(), BLOCK, "bench", codes, scale_inv)
    return codes, scale_inv


def differing(got: tuple[torch.Tensor, torch.Tensor], expected: tuple[torch.Tensor, torch.Tensor]) -> int:
    codes = int((got[0].cpu().view(torch.uint8) != expected[0].view(torch.uint8)).sum())
    return codes + int((got[1].cpu().view(torch.int32) != expected[1].view(torch.int32)).sum())


def gpu_results(weights: list[torch.Tensor], priors: list[torch.Tensor | None]) -> dict[str, list]:
    """Each kernel's answers: the one-tensor kernel (native and integer encode) and one batched launch."""
    results: dict[str, list] = {"one": [], "one integer encode": []}
    for weight, prior in zip(weights, priors, strict=True):
        results["one"].append(quant_fp8_blocks(weight, prior_scale=prior))
        codes, scale_inv = torch.empty_like(weight, dtype=torch.float8_e4m3fn), torch.empty_like(results["one"][-1][1])
        fp8_quant_triton.quant_one_triton(weight, prior, codes, scale_inv, BLOCK, native=False)
        results["one integer encode"].append((codes, scale_inv))
    results["batched"] = quant_fp8_blocks_batched(weights, prior_scales=priors)
    return results


@triton.jit
def _encode_both(values, native_codes, integer_codes, count, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    value = tl.load(values + offsets, mask=offsets < count)
    tl.store(native_codes + offsets, _encode_e4m3(value, True), mask=offsets < count)
    tl.store(integer_codes + offsets, _encode_e4m3(value, False), mask=offsets < count)


@triton.jit
def _divide(numerators, denominators, exact, plain, count, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    a = tl.load(numerators + offsets, mask=offsets < count)
    b = tl.load(denominators + offsets, mask=offsets < count)
    tl.store(exact + offsets, tl.math.div_rn(a, b), mask=offsets < count)
    tl.store(plain + offsets, a / b, mask=offsets < count)


def check_conversions(log) -> dict:
    """Every float32 within +-448: the GPU's e4m3 conversion, the integer encoder and torch's cast agree; and
    tl.math.div_rn against the CPU's IEEE division (plain `/` counted beside it) on 2**24 random pairs."""
    chunk = 1 << 27
    disagreements = {"native vs integer": 0, "native vs torch": 0}
    checked = 0
    for sign in (0, -(1 << 31)):
        for start in range(0, 0x43E00001, chunk):
            bits = torch.arange(start, min(start + chunk, 0x43E00001), dtype=torch.int32, device="cuda") | sign
            values = bits.view(torch.float32)
            native = torch.empty(values.shape, dtype=torch.int8, device="cuda")
            integer = torch.empty_like(native)
            _encode_both[(triton.cdiv(len(values), 4096),)](values, native, integer, len(values), BLOCK=4096)
            disagreements["native vs integer"] += int((native != integer).sum())
            disagreements["native vs torch"] += int((native != values.to(torch.float8_e4m3fn).view(torch.int8)).sum())
            checked += len(values)
    generator = torch.Generator(device="cuda").manual_seed(0)
    count = 1 << 24

    def spread():  # float32 across nearly all exponents, quotients into the subnormals and near overflow
        mantissa = torch.rand(count, generator=generator, device="cuda") + 1
        return mantissa * torch.exp2(torch.randint(-126, 127, (count,), generator=generator, device="cuda").float())

    numerators, denominators = spread(), spread()
    exact, plain = torch.empty_like(numerators), torch.empty_like(numerators)
    _divide[(triton.cdiv(count, 4096),)](numerators, denominators, exact, plain, count, BLOCK=4096)
    reference = (numerators.cpu() / denominators.cpu()).view(torch.int32)
    result = {
        "e4m3_values_checked": checked,
        "e4m3_disagreements": disagreements,
        "divisions_checked": count,
        "div_rn_vs_cpu_disagreements": int((exact.cpu().view(torch.int32) != reference).sum()),
        "plain_slash_vs_cpu_disagreements": int((plain.cpu().view(torch.int32) != reference).sum()),
    }
    log(f"conversions: {json.dumps(result)}")
    return result


def check_exactness(log) -> dict:
    """GPU bits against the CPU path's on every DeepSeek-V3 shape, without and with prior scales."""
    names = list(DEEPSEEK_SHAPES)
    weights = [realistic(shape, seed) for seed, shape in enumerate(DEEPSEEK_SHAPES.values())]
    weights += [weights[names.index("kv_a_proj_with_mqa")].float(), weights[names.index("kv_a_proj_with_mqa")].half()]
    names += ["kv_a_proj_with_mqa float32", "kv_a_proj_with_mqa float16"]
    report = {"tensors": names, "mismatched": {}, "prior_blocks": 0, "prior_kept": 0}
    plain = gpu_results(weights, [None] * len(weights))
    expected = [cpu_quant(w, None) for w in weights]
    for kind, answers in plain.items():
        report["mismatched"][kind] = sum(differing(got, want) for got, want in zip(answers, expected, strict=True))
    # prior scales: release pairs dequantised to bf16, one block of each changed
    released = [release_like(w, seed) for seed, w in enumerate(weights)]
    back = [dequant_fp8_blocks(codes, scale_inv).to(w.dtype) for (codes, scale_inv), w in zip(released, weights, strict=True)]
    for tensor in back:
        tensor[-1, :7] += 0.01
    priors = [scale_inv for _, scale_inv in released]
    with_prior = gpu_results(back, priors)
    expected = [cpu_quant(w, p) for w, p in zip(back, priors, strict=True)]
    for kind, answers in with_prior.items():
        report["mismatched"][f"{kind} with prior"] = sum(differing(got, want) for got, want in zip(answers, expected, strict=True))
    for (codes, scale_inv), prior, (released_codes, _) in zip(with_prior["one"], priors, released, strict=True):
        kept = scale_inv == prior
        report["prior_blocks"] += kept.numel()
        report["prior_kept"] += int(kept.sum())
        # where the prior is kept, the codes are the release's
        rows, cols = codes.shape
        mask = kept.repeat_interleave(BLOCK[0], 0)[:rows].repeat_interleave(BLOCK[1], 1)[:, :cols]
        report["mismatched"].setdefault("kept blocks vs release codes", 0)
        report["mismatched"]["kept blocks vs release codes"] += int((codes.view(torch.uint8)[mask] != released_codes.view(torch.uint8)[mask]).sum())
    poisoned = weights[0].clone()
    poisoned[700, 5] = float("nan")
    poisoned[900, 3] = float("inf")
    try:
        quant_fp8_blocks(poisoned, name="poisoned")
        report["refusal"] = "none raised"
    except FP8FormatError as error:
        report["refusal"] = str(error)
    report["refusal_ok"] = "2 of" in report["refusal"] and "row 700, column 5" in report["refusal"]
    log(f"exactness: {json.dumps(report)}")
    return report


def moved_bytes(shape: tuple[int, int]) -> int:
    grid = scale_shape(shape, BLOCK)
    return shape[0] * shape[1] * 3 + grid[0] * grid[1] * 4


def graph_ms(fn) -> float:
    # 10 graph replays of at least 25 ms each, median: about 0.3 s per method, the whole bench within 90 s
    return triton.testing.do_bench_cudagraph(fn, rep=25, return_mode="median")


def copy_bandwidth(log) -> float:
    source = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    ms = triton.testing.do_bench(lambda: target.copy_(source), rep=200, return_mode="median")
    gbs = 2 * source.numel() / ms / 1e6
    log(f"device copy: {gbs:.0f} GB/s (read + write)")
    return gbs


def per_shape(log, copy_gbs: float, rounds: int) -> list[dict]:
    rows_out = []
    for name, shape in DEEPSEEK_SHAPES.items():
        count = max(3, -(-ROTATE_BYTES // moved_bytes(shape)))
        weights = [realistic(shape, seed) for seed in range(count)]
        pairs = [quant_fp8_blocks(w) for w in weights]
        # unchanged weights: every block keeps its prior (one division); `weights` with the same priors keep none (two)
        released = [dequant_fp8_blocks(fp8, scale_inv) for fp8, scale_inv in pairs]
        priors = [scale_inv for _, scale_inv in pairs]
        codes = [fp8 for fp8, _ in pairs]
        scales = [torch.empty_like(scale_inv) for scale_inv in priors]
        sources = [torch.empty(moved_bytes(shape) // 2, dtype=torch.uint8, device="cuda") for _ in weights]
        targets = [torch.empty_like(source) for source in sources]

        def rotate(inputs, prior_scales, codes=codes, scales=scales, **options):
            def run():
                for weight, prior, fp8, scale_inv in zip(inputs, prior_scales, codes, scales, strict=True):
                    fp8_quant_triton.quant_one_triton(weight, prior, fp8, scale_inv, BLOCK, **options)

            return run

        no_priors = [None] * count
        methods = {
            "copy_same_bytes": lambda sources=sources, targets=targets: [t.copy_(s) for s, t in zip(sources, targets, strict=True)],
            "ours_default": rotate(weights, no_priors),
            **{f"ours_{variant}": rotate(weights, no_priors, **options) for variant, options in VARIANTS.items()},
            "ours_with_prior_all_kept": rotate(released, priors),
            "ours_with_prior_none_kept": rotate(weights, priors),
        }
        # methods take turns `rounds` times (clocks and neighbours drift); the median of each is kept
        samples = {key: [] for key in methods}
        for _ in range(rounds):
            for key, method in methods.items():
                samples[key].append(graph_ms(method) / count)
        row = {"tensor": name, "shape": list(shape), "rotated_buffers": count}
        for key, values in samples.items():
            row[key] = round(moved_bytes(shape) / statistics.median(values) / 1e6, 1)
        best = max((k for k in row if k.startswith("ours") and "prior" not in k and "sm_80" not in k), key=lambda k: row[k])
        row["best_ours"] = best
        row["best_vs_copy"] = round(row[best] / copy_gbs, 3)
        row["best_vs_copy_same_bytes"] = round(row[best] / row["copy_same_bytes"], 3)
        row["default_vs_copy_same_bytes"] = round(row["ours_default"] / row["copy_same_bytes"], 3)
        log(json.dumps(row))
        rows_out.append(row)
        del weights, pairs, released, priors, codes, scales, sources, targets
        torch.cuda.empty_cache()
    return rows_out


def whole_batch(log, copy_gbs: float) -> list[dict]:
    """An expert-sized batch: 96 experts x (gate, up, down), 8.5 GB of bf16."""
    shapes = [DEEPSEEK_SHAPES["expert gate/up"], DEEPSEEK_SHAPES["expert gate/up"], DEEPSEEK_SHAPES["expert down"]] * 96
    weights = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02 for shape in shapes]
    codes = [torch.empty(shape, dtype=torch.float8_e4m3fn, device="cuda") for shape in shapes]
    scales = [torch.empty(scale_shape(shape, BLOCK), dtype=torch.float32, device="cuda") for shape in shapes]
    total = sum(moved_bytes(shape) for shape in shapes)
    results = []

    def record(name, fn):
        ms = triton.testing.do_bench(fn, rep=300, return_mode="median")
        row = {"method": name, "ms": round(ms, 2), "GB/s": round(total / ms / 1e6, 1), "vs_copy": round(total / ms / 1e6 / copy_gbs, 3)}
        log(json.dumps(row))
        results.append(row)

    priors = [None] * len(weights)
    record("batched kernel, one launch", lambda: fp8_quant_triton.quant_many_triton(weights, priors, codes, scales, BLOCK))
    record("batched kernel, 8 warps", lambda: fp8_quant_triton.quant_many_triton(weights, priors, codes, scales, BLOCK, num_warps=8))

    def one_by_one():
        for weight, fp8, scale_inv in zip(weights, codes, scales, strict=True):
            fp8_quant_triton.quant_one_triton(weight, None, fp8, scale_inv, BLOCK)

    record("one launch per tensor", one_by_one)
    record("quant_fp8_blocks_batched (allocates, checks finiteness)", lambda: quant_fp8_blocks_batched(weights))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="write fp8_quant.json and fp8_quant.log here")
    parser.add_argument("--rounds", type=int, default=1, help="per shape: methods take turns this many times; medians kept")
    args = parser.parse_args(argv)
    lines = []

    def log(text):
        print(text, flush=True)
        lines.append(text)

    props = torch.cuda.get_device_properties(0)
    log(f"device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, triton {triton.__version__}")
    report = {"device": props.name, "torch": torch.__version__, "triton": triton.__version__}
    report["conversions"] = check_conversions(log)
    report["exactness"] = check_exactness(log)
    report["copy_gbs"] = copy_bandwidth(log)
    report["per_shape"] = per_shape(log, report["copy_gbs"], args.rounds)
    report["whole_batch"] = whole_batch(log, report["copy_gbs"])
    summary = statistics.median(row["default_vs_copy_same_bytes"] for row in report["per_shape"])
    log(f"median per-shape fraction of same-bytes copy bandwidth (default settings): {summary:.3f}")
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fp8_quant.json").write_text(text + "\n")
        (args.out / "fp8_quant.log").write_text("\n".join(lines) + "\n")
    conversions = report["conversions"]
    exact = (
        not any(report["exactness"]["mismatched"].values())
        and report["exactness"]["refusal_ok"]
        and not any(conversions["e4m3_disagreements"].values())
        and conversions["div_rn_vs_cpu_disagreements"] == 0
    )
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
