"""Bytes every rank of a cluster reads to load DeepSeek-V3 (671B) from a torch_dist checkpoint: a read plan.

    python -m bench.read_plan                                   # seed plan: TP4 PP16 EP2 ETP4, 16 x 8 GPUs
    python -m bench.read_plan --recipe verl-h20-16 --json
    python -m bench.read_plan --tp 8 --pp 16 --ep 8 --etp 1 --last 1 --nodes 16
    python -m bench.read_plan --metadata CKPT/release          # a real checkpoint's .metadata instead
    python -m bench.read_plan --model moonlight-16b-a3b --recipe pai-moonlight-1x8   # another preset's published config

Nothing is loaded. Each rank's requested slices come from the mapping table and the sharding table
(`converters.mcore.read_cost.rank_requests`, checked against megatron-core's own `sharded_state_dict` in
tests/test_converters/test_mcore_read_cost.py); every stored chunk a request overlaps is read whole, once per request, as
torch DCP's `FileSystemReader` does. The layouts are planned from the full-size shapes of
`converters.testing.deepseek_v3_config()` without data: `global` (what `convert hf-mcore` writes by
default: every tensor at its global shape, gate/up and every expert in their own chunks), `aligned`
(`--align-tp/--align-etp` at the plan's TP/ETP) and `tp1-whole-fc1` (a TP1 conversion that stores
SwiGLU `linear_fc1` as one chunk, gate and up together, per expert). Planned records count their
payload only (each stored record also carries ~1 KB of zip framing; real `.metadata` files give the
exact record lengths).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata

from converters.mcore.dist_ckpt import plan_pieces
from converters.mcore.mapping import Chunk, MappingPlan, McoreTensor, plan_mapping
from converters.mcore.params import hf_tensor_shapes
from converters.mcore.read_cost import ClusterRead, ParallelLayout, cluster_read, detect_alignment
from converters.mcore.to_hf import detect_spec
from converters.mcore.tp_layout import align_mapping
from converters.testing import deepseek_v3_config

LAYOUTS = ("global", "aligned", "tp1-whole-fc1")


def global_mapping(config: dict, drop_mtp: bool = False, spec: str = "te") -> MappingPlan:
    mtp_layers = 0 if drop_mtp else config.get("num_nextn_predict_layers") or 0
    return plan_mapping(config, hf_tensor_shapes(config, mtp_layers), spec, drop_mtp)


def whole_fc1(mapping: MappingPlan) -> MappingPlan:
    """SwiGLU fc1 stored as one chunk per tensor (per expert for routed experts), gate and up together."""
    tensors = []
    for tensor in mapping.tensors:
        if not tensor.key.endswith("linear_fc1.weight"):
            tensors.append(tensor)
            continue
        merged = McoreTensor(tensor.key, tensor.shape)
        leading = {c.offsets[0] for c in tensor.chunks} if len(tensor.shape) == 3 else {None}
        for expert in sorted(leading, key=lambda e: -1 if e is None else e):
            if expert is None:
                merged.chunks.append(Chunk((0,) * len(tensor.shape), tensor.shape, "gate+up"))
            else:
                merged.chunks.append(Chunk((expert, 0, 0), (1, *tensor.shape[1:]), f"gate+up {expert}"))
        tensors.append(merged)
    return MappingPlan(tensors, mapping.objects, mapping.used_sources)


def planned_metadata(mapping: MappingPlan) -> Metadata:
    """The `.metadata` a conversion with this chunk plan writes (tensors and objects; no record offsets)."""
    _, metadata = plan_pieces(mapping, lambda source: torch.float32 if source.endswith("e_score_correction_bias") else torch.bfloat16)
    return metadata


def layout_metadata(name: str, mapping: MappingPlan, tp: int, etp: int) -> Metadata:
    if name == "global":
        return planned_metadata(mapping)
    if name == "aligned":
        return planned_metadata(align_mapping(mapping, tp, etp))
    return planned_metadata(whole_fc1(mapping))


def summary(name: str, metadata: Metadata, read: ClusterRead, layout: ParallelLayout) -> dict:
    chunks = sum(len(getattr(m, "chunks", ())) for m in metadata.state_dict_metadata.values())
    return {
        "layout": name,
        "stored_chunks": chunks,
        "checkpoint_tb": round(read.checkpoint_bytes / 1e12, 3),
        "needed_tb": round(read.needed_bytes / 1e12, 3),
        "read_tb": round(read.read_bytes / 1e12, 3),
        "read_over_checkpoint": round(read.over_checkpoint, 3),
        "read_over_needed": round(read.over_needed, 3),
        "max_rank_gb": round(max(read.per_rank) / 1e9, 1),
        "max_node_gb": round(max(read.per_node) / 1e9, 1),
        "mean_node_gb": round(sum(read.per_node) / len(read.per_node) / 1e9, 1),
        "aligned_to": list(detect_alignment(metadata)),
        "missing": read.missing[:5],
        "plan": {"world": layout.world, "tp": layout.tp, "pp": layout.pp, "ep": layout.ep, "etp": layout.expert_tp,
                 "dp": layout.dp, "expert_dp": layout.expert_dp},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a `launch plan` preset (default: DeepSeek-V3)")
    parser.add_argument("--recipe", help="a `launch plan` recipe (default: pai-16x8 unless --tp is given)")
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--tp", type=int)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--etp", type=int)
    parser.add_argument("--first", type=int, help="layers in the first pipeline stage")
    parser.add_argument("--last", type=int, help="layers in the last pipeline stage")
    parser.add_argument("--drop-mtp", action="store_true", help="the checkpoint and model without the MTP layer")
    parser.add_argument("--duplicated-down-proj", action="store_true",
                        help="MLA down projections whole on every rank (unpatched TE spec; default: column-parallel, patched)")
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--metadata", type=Path, help="a checkpoint dir (with .metadata) to plan instead of the planned layouts")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.tp is None:
        from toolkit.recipes import RECIPES

        recipe = RECIPES[args.recipe or "pai-16x8"]
        layout = ParallelLayout(recipe.world, recipe.tp, recipe.pp, recipe.ep, recipe.etp, recipe.cp,
                                recipe.first_stage_layers, recipe.last_stage_layers)
        gpus_per_node = recipe.gpus_per_node
    else:
        layout = ParallelLayout(args.nodes * args.gpus_per_node, args.tp, args.pp, args.ep, args.etp, 1, args.first, args.last)
        gpus_per_node = args.gpus_per_node
    if args.model is None:
        config, name = deepseek_v3_config(), "DeepSeek-V3"
    else:
        from toolkit.presets import preset_config

        config, name = preset_config(args.model), args.model
    if args.metadata is not None:
        metadata = FileSystemReader(str(args.metadata)).read_metadata()
        keys = set(metadata.state_dict_metadata)
        drop_mtp = not any(k.startswith("mtp.") for k in keys)
        mapping = global_mapping(config, drop_mtp, detect_spec(keys))
        layouts = [(str(args.metadata), metadata)]
    else:
        mapping = global_mapping(config, args.drop_mtp)
        layouts = [(name, layout_metadata(name, mapping, layout.tp, layout.expert_tp)) for name in args.layouts]
    results = []
    for name, metadata in layouts:
        read = cluster_read(metadata, mapping, layout, gpus_per_node, args.duplicated_down_proj)
        results.append(summary(name, metadata, read, layout))
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    plan = results[0]["plan"]
    print(f"{name}, {layout.world} GPUs: TP{plan['tp']} PP{plan['pp']} EP{plan['ep']} ETP{plan['etp']} "
          f"(DP {plan['dp']}, expert DP {plan['expert_dp']})" + (", MLA down projections duplicated" if args.duplicated_down_proj else ""))
    print("| layout | stored chunks | cluster reads TB | x checkpoint | x needed | max per node GB | max per rank GB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['layout']} | {r['stored_chunks']} | {r['read_tb']} | {r['read_over_checkpoint']} | {r['read_over_needed']} "
              f"| {r['max_node_gb']} | {r['max_rank_gb']} |")
    print(f"checkpoint {results[0]['checkpoint_tb']} TB; the ranks keep {results[0]['needed_tb']} TB between them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
