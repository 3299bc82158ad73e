"""End-to-end benchmark of `convert bf16-fp8`, and the round trip on release-shaped blocks (GPU machine, or CPU).

    python -m bench.fp8_export_e2e --work DIR --gb 6 --device cuda --out OUT_DIR

A synthetic FP8 checkpoint of DeepSeek-V3 expert shapes (bench.fp8_e2e: random e4m3 codes over every
exponent, random float32 scales, a ragged 576x7168 weight) is cast to BF16 by `convert fp8-bf16`; then
`convert bf16-fp8 --like` (the release's scales kept where the weights are unchanged) is timed against the
disk floor (read the BF16 bytes, write the FP8 bytes, fsync) and its shards compared byte for byte with the
FP8 source. Without --like (fresh scales, amax / 448 of the BF16 block), every tensor is re-quantised by the
kernel and its codes and scales compared with the source's: how many blocks keep their codes, how many
scales come back equal, how far the others are.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from bench.fp8_e2e import io_floor, make_synthetic


def round_trip_without_like(fp8: Path, device: str) -> dict:
    """Dequantise each source tensor and quantise it again with fresh scales: codes and scales against the source."""
    from safetensors import safe_open

    from kernels.fp8 import dequant_fp8_blocks, quant_fp8_blocks

    blocks = same_code_blocks = same_scales = 0
    worst = 0.0
    for shard in sorted(fp8.glob("*.safetensors")):
        with safe_open(str(shard), "pt", device=device) as handle:
            for name in handle.keys():
                if name.endswith("_scale_inv"):
                    continue
                codes = handle.get_tensor(name)
                if codes.dtype != torch.float8_e4m3fn:
                    continue
                scale = handle.get_tensor(name + "_scale_inv")
                again, fresh = quant_fp8_blocks(dequant_fp8_blocks(codes, scale))
                rows, cols = codes.shape
                equal = (again.view(torch.uint8) == codes.view(torch.uint8))
                grid = torch.nn.functional.pad(equal, (0, -cols % 128, 0, -rows % 128), value=True)
                per_block = grid.view(grid.shape[0] // 128, 128, grid.shape[1] // 128, 128).all(dim=3).all(dim=1)
                blocks += per_block.numel()
                same_code_blocks += int(per_block.sum())
                same_scales += int((fresh == scale).sum())
                worst = max(worst, float(((fresh - scale).abs() / scale).max()))
    return {"blocks": blocks, "blocks_with_identical_codes": same_code_blocks, "identical_scales": same_scales,
            "max_relative_scale_difference": worst}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--gb", type=float, default=6.0, help="FP8 checkpoint size to generate")
    parser.add_argument("--shards", type=int, default=6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=2, help="runs of the command (the fastest counts)")
    parser.add_argument("--out", type=Path, default=None, help="write fp8_export_e2e.json here")
    args = parser.parse_args(argv)
    from converters.fp8.cast import run_cast
    from converters.fp8.plan import CastOptions, plan_cast
    from converters.fp8.quant_plan import QuantOptions, plan_quantise

    fp8, bf16 = args.work / "fp8", args.work / "bf16"
    if not (fp8 / "config.json").is_file():
        make_synthetic(fp8, args.gb, args.shards)
    if not (bf16 / "config.json").is_file():
        run_cast(plan_cast(fp8, bf16, CastOptions(device=args.device)))
    bf16_bytes = sum(p.stat().st_size for p in bf16.glob("*.safetensors"))
    fp8_bytes = sum(p.stat().st_size for p in fp8.glob("*.safetensors"))
    result: dict = {"device": args.device, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    "bf16_gb": round(bf16_bytes / 1e9, 3), "fp8_gb": round(fp8_bytes / 1e9, 3),
                    "floor": io_floor(bf16, fp8_bytes, args.work / "floor.bin"), "runs": []}
    dst = args.work / "back"
    for _ in range(args.repeats):
        shutil.rmtree(dst, ignore_errors=True)
        start = time.perf_counter()
        summary = run_cast(plan_quantise(bf16, dst, QuantOptions(device=args.device, like=fp8)))
        seconds = time.perf_counter() - start
        result["runs"].append({"seconds": round(seconds, 2), "stage_seconds": summary.stage_seconds,
                               "gb_per_s_read_plus_write": round((bf16_bytes + fp8_bytes) / 1e9 / seconds, 2)})
    best = min(run["seconds"] for run in result["runs"])
    result["best_seconds"] = best
    result["times_floor"] = round(best / result["floor"]["floor_s"], 2)
    shards = sorted(p.name for p in fp8.glob("*.safetensors"))
    result["shards_identical_to_source"] = sum((fp8 / n).read_bytes() == (dst / n).read_bytes() for n in shards)
    result["shards"] = len(shards)
    result["without_like"] = round_trip_without_like(fp8, args.device)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fp8_export_e2e.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
