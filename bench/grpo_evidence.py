"""Evidence from a GRPO run's saved checkpoint (bench/grpo_device.sh): what changed, and the saved layout.

  python -m bench.grpo_evidence weights --initial BF16_DIR --trained EXPORT_DIR   per-tensor change, JSON
  python -m bench.grpo_evidence layout --ckpt CHECKPOINTS/global_step_N          files and .metadata (names,
                                                                                  shapes, dtypes; no data), JSON
  python -m bench.grpo_evidence serve --model HF_DIR                             vLLM loads the export and
                                                                                  generates (GPU; logs its MLA backend)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def weights_change(initial: Path, trained: Path) -> dict:
    """Max |trained - initial| and its relative size per tensor the two HF dirs share."""
    from safetensors import safe_open

    def tensors(path: Path) -> dict:
        index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
        return {name: path / shard for name, shard in index.items()}

    before, after = tensors(initial), tensors(trained)
    rows = {}
    for name in sorted(set(before) & set(after)):
        with safe_open(str(before[name]), "pt") as a, safe_open(str(after[name]), "pt") as b:
            x, y = a.get_tensor(name).float(), b.get_tensor(name).float()
        diff = (y - x).abs().max().item()
        rows[name] = {"max_abs_change": diff, "relative": diff / max(x.abs().max().item(), 1e-12), "shape": list(x.shape)}
    changed = [name for name, row in rows.items() if row["max_abs_change"] > 0]
    return {"tensors": len(rows), "changed": len(changed), "unchanged": sorted(set(rows) - set(changed)),
            "only_initial": sorted(set(before) - set(after)), "only_trained": sorted(set(after) - set(before)), "per_tensor": rows}


def saved_layout(step_dir: Path) -> dict:
    """Every file under a verl global_step_N dir (relative path, size class) and each torch_dist .metadata's
    entries: tensors as name -> [shape, dtype], other objects by name. No tensor data."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    files = sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file())
    stores = {}
    for metadata in sorted(step_dir.rglob(".metadata")):
        meta = FileSystemReader(str(metadata.parent)).read_metadata()
        entries = {}
        for key, value in sorted(meta.state_dict_metadata.items()):
            if isinstance(value, TensorStorageMetadata):
                entries[key] = [list(value.size), str(value.properties.dtype).removeprefix("torch.")]
            else:
                entries[key] = "object"
        stores[str(metadata.parent.relative_to(step_dir))] = entries
    return {"step_dir": step_dir.name, "files": files, "dist_checkpoints": stores}


def serve(model: Path) -> dict:
    """vLLM (offline, eager) loads an HF dir and samples the smoke task's prompt greedily: the export serves,
    and the trained model answers in digits. vLLM logs the MLA backend it picked at INFO."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
               for text in ("Reply with a number: the sum", "Write digits only: find value")]
    llm = LLM(model=str(model), enforce_eager=True, gpu_memory_utilization=0.3, max_model_len=512, seed=0)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24))
    texts = [output.outputs[0].text for output in outputs]
    from launch.rewards import digit_share

    return {"model": str(model), "texts": texts, "digit_share": [digit_share(text) for text in texts]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.grpo_evidence", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    weights = commands.add_parser("weights")
    weights.add_argument("--initial", type=Path, required=True)
    weights.add_argument("--trained", type=Path, required=True)
    layout = commands.add_parser("layout")
    layout.add_argument("--ckpt", type=Path, required=True)
    served = commands.add_parser("serve")
    served.add_argument("--model", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "serve":
        result = serve(args.model)
    else:
        result = weights_change(args.initial, args.trained) if args.command == "weights" else saved_layout(args.ckpt)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
