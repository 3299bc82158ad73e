"""Every table derived from the model description, dumped as one JSON document: proof that a refactor keeps them.

    PYTHONPATH=. python -m bench.model_tables_identity --out new.json
    PYTHONPATH=/tmp/base python -m bench.model_tables_identity --out old.json   # the same script on another tree
    cmp old.json new.json

Dumped for the tiny test configs and the full DeepSeek-V3 config (with and without MTP, q_lora_rank null, tied
embeddings, the deepseek_v2 router), both specs: the HF names and shapes (`hf_tensor_shapes`), the mcore plan
(`plan_mapping`: tensors, chunks, extra-state objects, used sources, or its error), the plan re-cut at TP/ETP
1..8 (`align_mapping`), the TP rule of every key (`sharding_of`, `SHARDING`), the TE key map, the spec markers
and the detected spec of real captured key sets (tests/data/te_keys) and of our own plans, the HF regions
`convert mcore-hf` reads, `check_shapes`, the parameter counts `launch plan` uses and the ranks' load requests.
Only public names that existed before the description was introduced are used. Lists keep their order (it
decides the bytes written); big sections are given as a count and a sha256 of their canonical JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

from converters.mcore import check, to_hf
from converters.mcore.mapping import MappingPlan, check_shapes, plan_mapping
from converters.mcore.read_cost import ParallelLayout, rank_requests
from converters.mcore.tp_layout import SHARDING, align_mapping, sharding_of
from converters.testing import TINY_DEEPSEEK_V3, deepseek_v3_config
from launch.plan import count_params

CAPTURES = Path(__file__).resolve().parents[1] / "tests" / "data" / "te_keys"
ALIGNMENTS = ((1, 1), (2, 2), (4, 4), (8, 8), (8, 1), (2, 4))
TINY = {**TINY_DEEPSEEK_V3, "model_type": "deepseek_v3", "tie_word_embeddings": False, "topk_method": "noaux_tc"}
CASES: dict[str, dict[str, Any]] = {
    "tiny": TINY,
    "tiny-no-mtp": {**TINY, "num_nextn_predict_layers": 0},
    "tiny-q-lora-null": {**TINY, "q_lora_rank": None, "num_nextn_predict_layers": 0},
    "tiny-q-lora-null-mtp": {**TINY, "q_lora_rank": None},
    "tiny-tied": {**TINY, "tie_word_embeddings": True},
    "tiny-all-moe": {**TINY, "first_k_dense_replace": 0},
    "deepseek-v3": deepseek_v3_config(),
    "deepseek-v3-no-mtp": {**deepseek_v3_config(), "num_nextn_predict_layers": 0},
    "deepseek-v3-q-lora-null": {**deepseek_v3_config(), "q_lora_rank": None},
}


def digest(value: Any) -> dict[str, Any]:
    text = json.dumps(value, sort_keys=True)
    return {"count": len(value), "sha256": hashlib.sha256(text.encode()).hexdigest()}


def plan_json(plan: MappingPlan) -> dict[str, Any]:
    return {
        "tensors": [[t.key, list(t.shape), [[list(c.offsets), list(c.sizes), c.source, c.rows, c.cols] for c in t.chunks]]
                    for t in plan.tensors],
        "objects": list(plan.objects),
        "used_sources": sorted(plan.used_sources),
    }


def attempt(function, *args, **kwargs) -> Any:
    try:
        return function(*args, **kwargs)
    except Exception as exc:  # the error is part of the behaviour being compared
        return {"error": f"{type(exc).__name__}: {exc}"}


def case_tables(config: dict[str, Any], small: bool) -> dict[str, Any]:
    shown = (lambda value: value) if small else digest
    mtp = config.get("num_nextn_predict_layers") or 0
    shapes = to_hf.hf_tensor_shapes(config, mtp)
    out: dict[str, Any] = {
        "hf_shapes": shown([[name, list(shape)] for name, shape in shapes.items()]),
        "hf_shapes_no_mtp": shown([[name, list(shape)] for name, shape in to_hf.hf_tensor_shapes(config, 0).items()]),
        "check_shapes": check_shapes(config, shapes),
        "check_shapes_bad_kv": check_shapes({**config, "kv_lora_rank": config["kv_lora_rank"] + 8}, shapes),
        "check_shapes_bad_moe": check_shapes({**config, "moe_intermediate_size": config["moe_intermediate_size"] + 8}, shapes),
        "count_params": attempt(lambda: vars(count_params(config))),
    }
    for spec in ("te", "local"):
        for drop_mtp in (False, True):
            tag = f"{spec}{'-drop-mtp' if drop_mtp else ''}"
            plan = attempt(plan_mapping, config, shapes, spec, drop_mtp)
            if isinstance(plan, dict):
                out[f"plan/{tag}"] = plan
                continue
            out[f"plan/{tag}"] = {key: shown(value) for key, value in plan_json(plan).items()}
            out[f"sharding_of/{tag}"] = shown({t.key: list(vars(sharding_of(t.key, len(t.shape))).values()) for t in plan.tensors})
            for tp, etp in ALIGNMENTS:
                out[f"aligned/{tag}/tp{tp}-etp{etp}"] = digest(plan_json(align_mapping(plan, tp, etp))["tensors"])
            keys = {t.key for t in plan.tensors} | set(plan.objects)
            out[f"detect_spec/{tag}"] = attempt(to_hf.detect_spec, keys)
            out[f"checkpoint_spec/{tag}"] = check.checkpoint_spec(dict.fromkeys(keys))
            regions = attempt(to_hf.hf_regions, {**config, "num_nextn_predict_layers": 0 if drop_mtp else mtp}, keys)
            out[f"hf_regions/{tag}"] = regions if isinstance(regions, dict) and "error" in regions else shown(
                [[name, [[r.key, list(r.offsets), list(r.sizes)] for r in rs]] for name, rs in regions.items()])
            if small and spec == "te":
                layout = ParallelLayout(8, tp=2, pp=2, ep=2)
                out[f"rank_requests/{tag}"] = digest([[list(vars(r).values()) for r in rank_requests(plan, layout, rank)] for rank in range(8)])
    return out


def spec_markers() -> Any:
    markers = getattr(check, "SPEC_MARKERS", None)
    if markers is None:
        from converters.mcore.params import SPEC_MARKERS as markers
    return {spec: list(names) for spec, names in markers.items()}


def captured_specs() -> dict[str, Any]:
    found: dict[str, Any] = {}
    for path in sorted(CAPTURES.glob("*.json")):
        capture = json.loads(path.read_text())
        for model, entry in capture["models"].items():
            for layout, asked in entry["layouts"].items():
                tag = f"{path.stem}/{model}/{layout}"
                found[tag] = [check.checkpoint_spec(asked), attempt(to_hf.detect_spec, set(asked))]
    found["empty"] = [check.checkpoint_spec({}), attempt(to_hf.detect_spec, set())]
    return found


def tables() -> dict[str, Any]:
    return {
        "SHARDING": dict(SHARDING),
        "te_keys_map": {"dense": check.te_keys_map(True), "moe": check.te_keys_map(False)},
        "spec_markers": spec_markers(),
        "captured_specs": captured_specs(),
        "cases": {name: case_tables(config, name.startswith("tiny")) for name, config in CASES.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    args = parser.parse_args(argv)
    args.out.write_text(json.dumps(tables(), indent=1, sort_keys=True) + "\n")
    print(f"{args.out}: {args.out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
