"""CPU benchmark of the FP8 dequant path against plain PyTorch, on DeepSeek-V3 shapes.

    python -m bench.fp8_cpu [--threads N]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench.baselines import dequant_plain_torch
from bench.fp8_kernels import random_pair
from kernels.fp8 import dequant_fp8_blocks, quant_fp8_blocks

SHAPES = {"expert gate/up": (2048, 7168), "expert down": (7168, 2048), "kv_a_proj_with_mqa": (576, 7168), "q_b_proj": (24576, 1536)}


def best_seconds(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, shape in SHAPES.items():
        # realistic: Gaussian weights quantised by block (as released), and the worst case: uniform
        # random bytes, 1/16 of them e4m3 subnormals (slow denormal float32 products on x86)
        realistic = quant_fp8_blocks(torch.randn(shape) * 0.02)
        for data, (weight, scale) in (("quantised gaussian", realistic), ("random bytes", random_pair(shape, "cpu"))):
            elements = weight.numel()
            ours = elements / best_seconds(lambda w=weight, s=scale: dequant_fp8_blocks(w, s)) / 1e9
            plain = elements / best_seconds(lambda w=weight, s=scale: dequant_plain_torch(w, s)) / 1e9
            row = {"tensor": name, "data": data, "ours_gel_s": round(ours, 3), "plain_gel_s": round(plain, 3), "speedup": round(ours / plain, 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps({"threads": args.threads, "rows": rows}))


if __name__ == "__main__":
    main()
