"""Benchmarks of `convert hf-mcore`.

    python -m bench.mcore_e2e widths --work DIR [--experts 64] [--configs cpu:1 cuda:2 cpu:1:4/4]  # DeepSeek-V3 widths, FP8 source
    python -m bench.mcore_e2e versus --work DIR                  # vs build-model-load-all-then-save

`widths`: a generated FP8 checkpoint at real DeepSeek-V3 widths (hidden 7168, vocab 129280, a
dense layer of 18432, a MoE layer of experts of 2048, MLA dims as released): conversion time
against the I/O floor (read the source, write the output's bytes) and peak RSS. A config
DEVICE:READERS:TP/ETP converts with `--align-tp TP --align-etp ETP` (the layout for a training plan).
`versus`: on a small model, ours against the approach of verl's converter (build the Megatron
model, hold every HF tensor, then `dist_checkpointing.save`): time and peak RSS ratios.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from bench.fp8_e2e import io_floor

DEEPSEEK_WIDTHS = {
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_shared_experts": 1,
    "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "first_k_dense_replace": 1, "num_hidden_layers": 2,
    "num_nextn_predict_layers": 0, "model_type": "deepseek_v3", "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid", "topk_method": "noaux_tc", "rms_norm_eps": 1e-6, "rope_theta": 10000,
    "max_position_embeddings": 4096, "tie_word_embeddings": False,
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
}


def make_wide_fp8(dst: Path, experts: int, values: str = "random") -> int:
    """FP8 tensors with DeepSeek-V3's names and shapes (2 layers: dense, MoE); returns bytes.

    values "random": uniform random e4m3 bytes (1 in 16 subnormal, the slow case for CPU dequant);
    "normal": Gaussian weights quantised by our kernel, like released checkpoints (subnormals rare).
    """
    from safetensors.torch import save_file

    from bench.fp8_kernels import random_pair
    from kernels.fp8 import quant_fp8_blocks

    config = {**DEEPSEEK_WIDTHS, "n_routed_experts": experts}
    h, heads = config["hidden_size"], config["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], h), "lm_head.weight": (config["vocab_size"], h), "model.norm.weight": (h,)}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_a_proj.weight": (1536, h), p + "self_attn.q_a_layernorm.weight": (1536,),
            p + "self_attn.q_b_proj.weight": (heads * 192, 1536), p + "self_attn.kv_a_proj_with_mqa.weight": (576, h),
            p + "self_attn.kv_a_layernorm.weight": (512,), p + "self_attn.kv_b_proj.weight": (heads * 256, 512),
            p + "self_attn.o_proj.weight": (h, heads * 128),
        })
    for proj, shape in (("gate_proj", (18432, h)), ("up_proj", (18432, h)), ("down_proj", (h, 18432))):
        shapes[f"model.layers.0.mlp.{proj}.weight"] = shape
    p = "model.layers.1.mlp."
    shapes.update({p + "gate.weight": (experts, h), p + "gate.e_score_correction_bias": (experts,)})
    for proj, shape in (("gate_proj", (2048, h)), ("up_proj", (2048, h)), ("down_proj", (h, 2048))):
        shapes[f"{p}shared_experts.{proj}.weight"] = shape
        for e in range(experts):
            shapes[f"{p}experts.{e}.{proj}.weight"] = shape
    dst.mkdir(parents=True, exist_ok=True)
    weight_map, shard, size, index, total = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, size, index
        if shard:
            name = f"model-{index + 1:05d}.safetensors"
            save_file(shard, str(dst / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard, size, index = {}, 0, index + 1

    for name, shape in shapes.items():
        if len(shape) == 2 and "embed" not in name and "lm_head" not in name and "mlp.gate.weight" not in name:
            if values == "normal":
                shard[name], shard[name + "_scale_inv"] = quant_fp8_blocks(torch.randn(shape) * 0.02)
            else:
                shard[name], shard[name + "_scale_inv"] = (t.cpu() for t in random_pair(shape, "cpu"))
        elif name.endswith("bias"):
            shard[name] = torch.rand(shape, dtype=torch.float32)
        else:
            shard[name] = (torch.randn(shape) * 0.02).to(torch.bfloat16)
        size += shard[name].numel() * shard[name].element_size()
        total += sum(shard[k].numel() * shard[k].element_size() for k in (name, name + "_scale_inv") if k in shard)
        if size > 2e9:
            flush()
    flush()
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return total


def _digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            while block := handle.read(16 * 1024 * 1024):
                digest.update(block)
    return digest.hexdigest()


def timed(command: list[str]) -> dict:
    """Run a command under /usr/bin/time: its own wall time and peak RSS (and its --json summary, if any)."""
    result = subprocess.run(["/usr/bin/time", "-f", "TIMED %e %M", *command], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    seconds, peak_kb = result.stderr.strip().splitlines()[-1].split()[1:]
    timing = {"seconds": float(seconds), "peak_rss_gb": round(int(peak_kb) / 1e6, 2)}
    if result.stdout.lstrip().startswith("{"):
        summary = json.loads(result.stdout)
        timing["stage_seconds"] = summary.get("stage_seconds")
        timing["conversion_s"] = summary.get("seconds")  # the process less interpreter start and imports
    return timing


def widths(work: Path, experts: int, repeats: int = 1, configs: tuple[str, ...] = ("cpu:1",), workers: int = 1,
           values: str = "random") -> dict:
    """Each config (DEVICE:READERS) and the floor take turns `repeats` times (the disk's speed drifts); best of each."""
    src, dst = work / "fp8", work / "mcore"
    shutil.rmtree(work, ignore_errors=True)
    source_bytes = make_wide_fp8(src, experts, values)
    runs: dict[str, list[dict]] = {config: [] for config in configs}
    digests: dict[str, str] = {}
    floors = []
    for repeat in range(repeats):
        for config in configs:
            device, readers, *align = config.split(":")
            layout = ["--align-tp", align[0].split("/")[0], "--align-etp", align[0].split("/")[1]] if align else []
            shutil.rmtree(dst, ignore_errors=True)
            os.sync()
            runs[config].append(timed([sys.executable, "-m", "converters.cli", "hf-mcore", "--src", str(src), "--dst", str(dst),
                                       "--device", device, "--readers", readers, "--workers", str(workers), "--quiet", "--json", *layout]))
            out_bytes = sum(p.stat().st_size for p in (dst / "release").glob("*.distcp"))
            if repeat == 0:  # configs of one layout must write the same files (GPU and CPU dequant included)
                digests[config] = (tuple(align), _digest(sorted((dst / "release").glob("*.distcp"))))
        shutil.rmtree(dst, ignore_errors=True)
        os.sync()
        floors.append(io_floor(src, out_bytes, work / "floor.bin"))
    floor = min(floors, key=lambda f: f["floor_s"])
    results = {}
    for config, timings in runs.items():
        best = min(timings, key=lambda r: r["seconds"])
        results[config] = {"best": best, "vs_floor": round(best["seconds"] / floor["floor_s"], 2), "all_s": [r["seconds"] for r in timings],
                           "conversion_vs_floor": round(best["conversion_s"] / floor["floor_s"], 2)}
    return {"experts": experts, "values": values, "workers": workers, "cores": os.cpu_count(), "source_gb": round(source_bytes / 1e9, 2),
            "output_gb": round(out_bytes / 1e9, 2), "outputs_identical": len(set(digests.values())) == len({layout for layout, _ in digests.values()}), "floor": floor, "all_floors_s": [f["floor_s"] for f in floors], "runs": results}


LOAD_ALL_SCRIPT = """
import sys, torch
from pathlib import Path
from converters.mcore.shim import install_cpu_shim
from converters.mcore.world import init_distributed
from converters.mcore.check import build_model
from converters.testing import load_checkpoint
import json
install_cpu_shim(); init_distributed(0, 1, int(sys.argv[4]))
from megatron.core import dist_checkpointing
hf, ours, out = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
config = json.loads((hf / "config.json").read_text())
model = build_model(config, 1, 1, 1, "te")
everything = load_checkpoint(hf)  # every HF tensor in memory, as verl's converter holds them
state = dist_checkpointing.load(model.sharded_state_dict(), str(ours))  # stands in for the HF->model copy
model.load_state_dict({k: v for k, v in state.items() if k not in ("checkpoint_version", "iteration")}, strict=False)
Path(out).mkdir(parents=True, exist_ok=True)
dist_checkpointing.save(model.sharded_state_dict(), out)
"""


def versus(work: Path) -> dict:
    from converters.mcore.world import free_port
    from converters.testing import make_fp8_checkpoint

    shutil.rmtree(work, ignore_errors=True)
    fp8, bf16 = work / "fp8", work / "bf16"
    overrides = {"hidden_size": 1024, "n_routed_experts": 32, "moe_intermediate_size": 512, "intermediate_size": 2816, "num_hidden_layers": 4, "vocab_size": 8192}
    make_fp8_checkpoint(fp8, overrides=overrides, shards=4)
    subprocess.run([sys.executable, "-m", "converters.cli", "fp8-bf16", "--src", str(fp8), "--dst", str(bf16), "--quiet"], check=True)
    ours = timed([sys.executable, "-m", "converters.cli", "hf-mcore", "--src", str(bf16), "--dst", str(work / "ours"), "--quiet"])
    load_all = timed([sys.executable, "-c", LOAD_ALL_SCRIPT, str(bf16), str(work / "ours" / "release"), str(work / "load-all"), str(free_port())])
    size = sum(p.stat().st_size for p in bf16.glob("*.safetensors"))
    return {"model_gb": round(size / 1e9, 3), "ours": ours, "load_all_then_save": load_all,
            "time_ratio": round(load_all["seconds"] / ours["seconds"], 2), "memory_ratio": round(load_all["peak_rss_gb"] / ours["peak_rss_gb"], 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["widths", "versus"])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="widths: alternate ours and the floor this many times")
    parser.add_argument("--configs", nargs="+", default=["cpu:1"], metavar="DEVICE:READERS",
                        help="widths: hf-mcore runs to compare, e.g. cpu:1 cpu:4 cuda:2 (--device and --readers)")
    parser.add_argument("--values", choices=["random", "normal"], default="random", help="widths: FP8 contents (see make_wide_fp8)")
    parser.add_argument("--workers", type=int, default=1, help="widths: convert hf-mcore --workers")
    args = parser.parse_args(argv)
    report = widths(args.work, args.experts, args.repeats, tuple(args.configs), args.workers, args.values) if args.what == "widths" else versus(args.work)
    print(json.dumps(report, indent=2))
    shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
