"""Converted checkpoints in the model verl builds: Transformer Engine spec, NCCL, several layouts (GPU node).

    python -m bench.te_load --work /tmp/te-load --out OUT_DIR [--layouts tp1 tp2 ep2 pp2] [--gpus 2]

Makes the three test models (with MTP, without MTP, q_lora_rank null) with our fixtures, casts each
FP8 checkpoint to BF16 (the transformers reference) and converts it with `convert hf-mcore` at its
defaults (`--spec te`). Then one NCCL world of `--gpus` processes runs, for every model and layout,
what `python -m converters.mcore.check --backend te` runs: the TE-spec GPTModel with grouped experts
and sequence parallel at TP > 1, the keys it asks for against the checkpoint's `.metadata`, verl's
exact load call, and the logits against transformers (float32 on CPU).

Writes OUT_DIR/te_load.json (per model and layout: asked tensors/objects, missing keys, parameters
left unset, max |logits diff|, cosine) and OUT_DIR/te_keys.json, the key set and global shapes the
real TE model asked for: the CI guard's data (tests/data/te_keys/).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

MODELS = {
    "mtp": {},
    "no-mtp": {"num_nextn_predict_layers": 0},
    "q-lora-null": {"q_lora_rank": None, "num_nextn_predict_layers": 0},
}
LAYOUTS = {"tp1": (1, 1, 1), "tp2": (2, 1, 1), "ep2": (1, 1, 2), "pp2": (1, 2, 1)}


def make_models(work: Path) -> dict[str, dict[str, Path]]:
    from converters.testing import make_fp8_checkpoint

    made = {}
    for name, overrides in MODELS.items():
        fp8, bf16, mcore = work / name / "fp8", work / name / "bf16", work / name / "mcore"
        if not (mcore / "release" / ".metadata").is_file():
            make_fp8_checkpoint(fp8, overrides=overrides, shards=2)
            for command in (["fp8-bf16", "--src", str(fp8), "--dst", str(bf16)], ["hf-mcore", "--src", str(fp8), "--dst", str(mcore)]):
                subprocess.run([sys.executable, "-m", "converters.cli", *command, "--quiet"], check=True)
        made[name] = {"bf16": bf16, "release": mcore / "release"}
    return made


def _rank(rank: int, world: int, port: int, models: dict, layouts: list[str], scratch: str, backend: str) -> None:
    from converters.mcore.check import check_on_rank
    from converters.mcore.world import init_layout, init_world

    init_world(rank, world, port, backend == "te")  # cpu: gloo and the local spec, a dry run without GPUs
    for name, paths in models.items():
        config = json.loads((Path(paths["bf16"]) / "config.json").read_text())
        for layout in layouts:
            tp, pp, ep = LAYOUTS[layout]
            init_layout(tp, pp, ep, backend == "te")
            started = time.perf_counter()
            try:
                outcome = check_on_rank(config, str(paths["release"]), tp, pp, ep, "te", backend)
            except Exception as exc:  # recorded, and the other checks still run
                outcome = {"error": f"{type(exc).__name__}: {exc}"[:2000], "loaded": False}
            outcome["seconds"] = round(time.perf_counter() - started, 2)
            torch.save(outcome, os.path.join(scratch, f"{name}-{layout}-{rank}.pt"))
            torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--gpus", type=int, default=2, help="processes (one per GPU)")
    parser.add_argument("--backend", choices=["te", "cpu"], default="te", help="cpu: gloo and the local spec, to try the script without GPUs")
    args = parser.parse_args(argv)
    from converters.mcore.check import agreement_with_hf, versions
    from converters.mcore.world import NCCL_SAFE_ENV, free_port

    args.out.mkdir(parents=True, exist_ok=True)
    models = make_models(args.work)
    scratch = args.work / "outcomes"
    scratch.mkdir(parents=True, exist_ok=True)
    os.environ.update(NCCL_SAFE_ENV)
    torch.multiprocessing.start_processes(
        _rank, args=(args.gpus, free_port(), {k: {p: str(v) for p, v in d.items()} for k, d in models.items()}, args.layouts, str(scratch), args.backend),
        nprocs=args.gpus, start_method="spawn", join=True,
    )
    summary: dict = {"versions": versions(), "backend": args.backend, "gpus": args.gpus, "results": {}}
    keys: dict = {"versions": summary["versions"], "models": {}}
    for name, paths in models.items():
        keys["models"][name] = {"overrides": MODELS[name], "layouts": {}}
        for layout in args.layouts:
            outcome = torch.load(scratch / f"{name}-{layout}-{args.gpus - 1}.pt", weights_only=False)
            row = {key: outcome.get(key) for key in ("error", "missing", "wrong_shape", "loaded", "unset", "checkpoint_spec", "seconds")}
            asked = outcome.get("asked", {})
            row["asked_tensors"] = sum(v is not None for v in asked.values())
            row["asked_objects"] = sum(v is None for v in asked.values())
            if outcome.get("loaded"):
                row["max_abs_diff"], row["cosine"] = agreement_with_hf(paths["bf16"], outcome["ids"], outcome["logits"])
            summary["results"][f"{name}/{layout}"] = row
            if asked:
                keys["models"][name]["layouts"][layout] = asked
            print(f"{name:12s} {layout}: {json.dumps(row)}", flush=True)
    (args.out / "te_load.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "te_keys.json").write_text(json.dumps(keys, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
