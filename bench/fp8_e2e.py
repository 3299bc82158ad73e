"""End-to-end benchmark of `convert fp8-bf16` on a generated FP8 checkpoint of DeepSeek-V3 shapes.

    python -m bench.fp8_e2e --work DIR --gb 6 --device cuda

Measures, on the same disk: the I/O floor (read every source byte, then write the output's bytes
with a plain sequential write and fsync), our converter, and a sequential load -> dequant -> save
loop like the reference script (safetensors load_file, per-tensor dequant, save_file). Each run is a
fresh subprocess, so its peak RSS is its own. Outputs are compared tensor by tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from toolkit.safetensors_index import INDEX_NAME

EXPERT_SHAPES = [(2048, 7168), (2048, 7168), (7168, 2048)]


def make_synthetic(dst: Path, gigabytes: float, shards: int) -> int:
    """Shards of routed experts (plus a ragged kv_a_proj, norms and an fp32 bias): FP8 with scales."""
    from safetensors.torch import save_file

    from bench.fp8_kernels import random_pair

    dst.mkdir(parents=True, exist_ok=True)
    per_expert = sum(r * c for r, c in EXPERT_SHAPES)
    experts_per_shard = max(1, int(gigabytes * 1e9 / shards / per_expert))
    weight_map = {}
    total = 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for index in range(shards):
        name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        prefix = f"model.layers.{index + 3}."
        for expert in range(experts_per_shard):
            for proj, shape in zip(("gate_proj", "up_proj", "down_proj"), EXPERT_SHAPES, strict=True):
                weight, scale = random_pair(shape, device)
                key = f"{prefix}mlp.experts.{expert}.{proj}.weight"
                tensors[key], tensors[key + "_scale_inv"] = weight.cpu(), scale.cpu()
        weight, scale = random_pair((576, 7168), device)
        tensors[prefix + "self_attn.kv_a_proj_with_mqa.weight"] = weight.cpu()
        tensors[prefix + "self_attn.kv_a_proj_with_mqa.weight_scale_inv"] = scale.cpu()
        tensors[prefix + "input_layernorm.weight"] = torch.ones(7168, dtype=torch.bfloat16)
        tensors[prefix + "mlp.gate.e_score_correction_bias"] = torch.rand(256, dtype=torch.float32)
        save_file(tensors, str(dst / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    (dst / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = {"model_type": "deepseek_v3", "num_hidden_layers": 61, "torch_dtype": "bfloat16", "quantization_config": {"weight_block_size": [128, 128]}}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return total


def io_floor(src: Path, out_bytes: int, scratch: Path) -> dict:
    """Read every source byte once; write out_bytes sequentially and fsync: the floor for any converter."""
    buffer = bytearray(64 * 1024 * 1024)
    start = time.perf_counter()
    read = 0
    for shard in sorted(src.glob("*.safetensors")):
        with open(shard, "rb", buffering=0) as handle:
            while count := handle.readinto(buffer):
                read += count
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    with open(scratch, "wb", buffering=0) as handle:
        left = out_bytes
        while left > 0:
            left -= handle.write(memoryview(buffer)[: min(left, len(buffer))])
        os.fsync(handle.fileno())
    write_s = time.perf_counter() - start
    scratch.unlink()
    return {"read_s": round(read_s, 2), "write_s": round(write_s, 2), "floor_s": round(read_s + write_s, 2), "bytes_read": read, "bytes_written": out_bytes}


def sequential_reference(src: Path, dst: Path, device: str) -> None:
    """Like the reference script: whole shard in, dequant tensor by tensor, whole shard out."""
    from safetensors.torch import load_file, save_file

    from bench.baselines import dequant_plain_torch, dequant_tile_reference

    dequant = dequant_tile_reference if device == "cuda" else dequant_plain_torch
    dst.mkdir(parents=True, exist_ok=True)
    for shard in sorted(src.glob("*.safetensors")):
        state = load_file(str(shard), device=device)
        out = {}
        for name, tensor in state.items():
            if name.endswith("_scale_inv"):
                continue
            out[name] = dequant(tensor, state[name + "_scale_inv"]).cpu() if tensor.dtype == torch.float8_e4m3fn else tensor.cpu()
        save_file(out, str(dst / shard.name), metadata={"format": "pt"})
        with open(dst / shard.name, "rb") as handle:
            os.fsync(handle.fileno())
        del state, out


def _fp8_infos(src: Path):
    from toolkit.safetensors_index import read_header

    for shard in sorted(src.glob("*.safetensors")):
        yield from (t for t in read_header(shard).tensors.values() if t.dtype == "F8_E4M3")


def _scale_bytes(info) -> int:
    rows, cols = info.shape
    return -(-rows // 128) * -(-cols // 128) * 4


def run_one(method: str, src: Path, dst: Path, device: str, workers: int) -> dict:
    start = time.perf_counter()
    stages = None
    if method == "ours":
        from converters.fp8.cast import run_cast
        from converters.fp8.plan import CastOptions, plan_cast

        summary = run_cast(plan_cast(src, dst, CastOptions(device=device, workers=workers)))
        stages = summary.stage_seconds
    else:
        sequential_reference(src, dst, device)
    seconds = time.perf_counter() - start
    peak_kb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return {"method": method, "seconds": round(seconds, 2), "peak_rss_gb": round(peak_kb / 1e6, 2), "stage_seconds": stages}


def same_tensors(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    for shard in sorted(a.glob("*.safetensors")):
        left, right = load_file(str(shard)), load_file(str(b / shard.name))
        if set(left) != set(right) or any(not torch.equal(left[k].view(torch.uint8), right[k].view(torch.uint8)) for k in left):
            return False
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--gb", type=float, default=6.0, help="FP8 checkpoint size to generate")
    parser.add_argument("--shards", type=int, default=6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each method (the fastest counts)")
    parser.add_argument("--out", type=Path, default=None, help="write e2e.json here")
    parser.add_argument("--run-one", choices=["ours", "sequential"], help=argparse.SUPPRESS)
    parser.add_argument("--dst", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    src = args.work / "fp8"
    if args.run_one:
        print(json.dumps(run_one(args.run_one, src, args.dst, args.device, args.workers)))
        return 0
    start = time.perf_counter()
    fp8_bytes = make_synthetic(src, args.gb, args.shards)
    generate_s = time.perf_counter() - start
    os.sync()
    expected_out = sum(2 * t.numel for t in _fp8_infos(src)) + fp8_bytes - sum(t.numel + _scale_bytes(t) for t in _fp8_infos(src))
    floors = []
    runs = []
    for repeat in range(args.repeats):
        floors.append(io_floor(src, expected_out, args.work / "floor.bin"))
        os.sync()
        for method in ("ours", "sequential"):
            dst = args.work / method
            shutil.rmtree(dst, ignore_errors=True)
            os.sync()
            command = [sys.executable, "-m", "bench.fp8_e2e", "--work", str(args.work), "--device", args.device, "--workers", str(args.workers), "--run-one", method, "--dst", str(dst)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                print(result.stderr[-3000:], file=sys.stderr)
                return 1
            runs.append({**json.loads(result.stdout.strip().splitlines()[-1]), "repeat": repeat})
    out_bytes = sum(p.stat().st_size for p in (args.work / "ours").glob("*.safetensors"))
    floor = min(floors, key=lambda f: f["floor_s"])
    best = {method: min((r for r in runs if r["method"] == method), key=lambda r: r["seconds"]) for method in ("ours", "sequential")}
    identical = same_tensors(args.work / "ours", args.work / "sequential")
    report = {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "fp8_gb": round(fp8_bytes / 1e9, 2),
        "bf16_gb": round(out_bytes / 1e9, 2),
        "generate_s": round(generate_s, 1),
        "floor": floor,
        "runs": runs,
        "ours_vs_floor": round(best["ours"]["seconds"] / floor["floor_s"], 2),
        "sequential_vs_ours": round(best["sequential"]["seconds"] / best["ours"]["seconds"], 2),
        "outputs_identical": identical,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"fp8_e2e_{args.device}.json").write_text(json.dumps(report, indent=2))
    for method in ("ours", "sequential"):
        shutil.rmtree(args.work / method, ignore_errors=True)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
