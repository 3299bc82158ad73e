"""Conversions with several GPUs of one node: same bytes as one GPU and as the CPU path, and the time.

    python -m bench.multi_gpu_convert --work /tmp/mgc --gb 8 --gpus 2 [--cpu-workers 8] [--experts 16]

fp8-bf16: a generated FP8 checkpoint of DeepSeek-V3 expert shapes (bench.fp8_e2e.make_synthetic) is
cast with `--device cuda --workers 1`, `--device cuda --workers N` (one process per GPU) and
`--device cpu --workers W`, alternating, each a fresh `convert` process; every output file is
hashed. hf-mcore: a 2-layer checkpoint at DeepSeek-V3 widths (bench.mcore_e2e.make_wide_fp8) is
converted with `--device cuda` and `--device cpu`; the .distcp and .metadata files are hashed.
Prints one JSON object (times are process wall seconds, the fastest of --repeats).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def _digest_tree(dst: Path, patterns: tuple[str, ...]) -> str:
    from bench.mcore_e2e import _digest

    return _digest(sorted(p for pattern in patterns for p in dst.glob(pattern)))


def fp8_bf16(work: Path, gigabytes: float, gpus: int, cpu_workers: int, repeats: int) -> dict:
    from bench.fp8_e2e import make_synthetic
    from bench.mcore_e2e import timed

    src = work / "fp8"
    if not src.is_dir():
        make_synthetic(src, gigabytes, shards=max(8, 2 * gpus))
    configs = {"cuda-x1": ["--device", "cuda", "--workers", "1"], f"cuda-x{gpus}": ["--device", "cuda", "--workers", str(gpus)],
               f"cpu-x{cpu_workers}": ["--device", "cpu", "--workers", str(cpu_workers)]}
    runs: dict[str, list[float]] = {name: [] for name in configs}
    digests: dict[str, str] = {}
    for _ in range(repeats):
        for name, flags in configs.items():
            dst = work / f"bf16-{name}"
            shutil.rmtree(dst, ignore_errors=True)
            runs[name].append(timed([sys.executable, "-m", "converters.cli", "fp8-bf16", "--src", str(src), "--dst", str(dst), *flags, "--json"])["seconds"])
            digests[name] = _digest_tree(dst, ("*.safetensors", "*.json"))
            shutil.rmtree(dst)
    best = {name: min(times) for name, times in runs.items()}
    return {"source_gb": round(sum(p.stat().st_size for p in src.glob("*.safetensors")) / 1e9, 2), "seconds": runs, "best_s": best,
            "speedup_vs_one_gpu": round(best["cuda-x1"] / best[f"cuda-x{gpus}"], 2),
            "identical": len(set(digests.values())) == 1, "digests": digests}


def hf_mcore(work: Path, experts: int) -> dict:
    from bench.mcore_e2e import make_wide_fp8, timed

    src = work / "wide"
    if not src.is_dir():
        make_wide_fp8(src, experts, values="normal")
    result = {}
    digests = {}
    dst = work / "mcore"  # one path for both: torch records the destination in .metadata (checkpoint_id)
    for device in ("cuda", "cpu"):
        shutil.rmtree(dst, ignore_errors=True)
        result[f"{device}_s"] = timed([sys.executable, "-m", "converters.cli", "hf-mcore", "--src", str(src), "--dst", str(dst), "--device", device, "--json"])["seconds"]
        digests[device] = _digest_tree(dst / "release", ("*.distcp", ".metadata"))
    shutil.rmtree(dst)
    return {**result, "experts": experts, "identical": digests["cuda"] == digests["cpu"], "digests": digests}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--gb", type=float, default=8.0, help="fp8-bf16: FP8 checkpoint size to generate")
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--cpu-workers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=16, help="hf-mcore: routed experts in the wide checkpoint")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", choices=["fp8-bf16", "hf-mcore"])
    args = parser.parse_args(argv)
    report = {}
    if args.only in (None, "fp8-bf16"):
        report["fp8_bf16"] = fp8_bf16(args.work, args.gb, args.gpus, args.cpu_workers, args.repeats)
    if args.only in (None, "hf-mcore"):
        report["hf_mcore"] = hf_mcore(args.work, args.experts)
    print(json.dumps(report, indent=2))
    shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
