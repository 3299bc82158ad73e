"""`patcher`: command-line entry that parses arguments and calls patcher.targets (what PATH is) and its patches."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from patcher.megatron_tree import MegatronTree
from patcher.stack import tree_advice
from patcher.states import PatchError, Status
from patcher.targets import resolve
from toolkit.version import __version__

DESCRIPTION = """\
Patch Megatron-Core and DeepSeek-V3 configs for verl GRPO.

Megatron: four libcst codemods; `apply` adds what the tree's release and layout need:
  export-flag    core/extensions/transformer_engine.py: duplicated TELinear weights get
                 tensor_model_parallel=False (backport of megatron-core 0.17), so exporters that
                 gather by that flag send vLLM one copy. Needed on 0.14-0.16; upstream from 0.17.
  rope-gradient  core/transformer/multi_latent_attention.py: in the column-parallel down-projection
                 branch, k_pos_emb's gradient is summed over TP ranks (Megatron-LM #1699). Needed
                 wherever the down projections are column-parallel: 0.12/0.13 as released, or after
                 --seed-edit; --rope-fix adds it anyway (0.17+ with mla_down_proj_fusion=True).
  seed-edit      core/models/gpt/gpt_layer_specs.py: the how-to's edit, duplicated q/kv down
                 projections -> column-parallel. Only with --seed-edit, and then always together
                 with rope-gradient (alone it skews TP > 1 gradients).
  q-proj-norm    core/transformer/mla_qk_norm_config.py (0.19+): without a query LoRA (q_lora_rank
                 null: DeepSeek-V2-Lite, Moonlight) linear_q_proj stays a plain linear instead of
                 getting a fused RMSNorm that HF checkpoints have no weights for. Needed on 0.19+;
                 <= 0.18 has no such file. Harmless to models with a query LoRA.
Default: 0.12/0.13 rope-gradient; 0.14-0.16 export-flag; 0.17/0.18 nothing; 0.19+ q-proj-norm.

HF model dir: config.json loses quantization_config and gets num_nextn_predict_layers: 0. An FP8
checkpoint (index lists *_scale_inv, or float8 tensors) is refused: convert it first.

PATH may be a Megatron-LM checkout, its megatron/ dir, a site-packages dir, one of the patched files,
a HF model dir or its config.json. Each original is kept once as <file>.orig for an exact revert
(a symlinked file, as in HF hub snapshots, becomes a regular file; revert restores the link).
"""

EPILOG = """\
exit codes:
  0  done (status: everything needed is applied or nothing is needed)
  1  status only: a patch this tree needs is missing (also: column-parallel down projections
     without the rope-gradient fix)
  2  unsupported file or structure, FP8 checkpoint, or another error; nothing was written

examples:
  patcher status                             # the megatron-core this Python imports
  patcher apply --dry-run /opt/Megatron-LM   # the unified diff of every file, nothing written
  patcher apply /opt/Megatron-LM             # what this release needs
  patcher apply --seed-edit /opt/Megatron-LM # the how-to's column edit + the rope-gradient fix
  patcher apply /models/DeepSeek-V3-0324-BF16   # config.json
  patcher revert /opt/Megatron-LM            # every patch of the tree
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="patcher", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, path_required: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        if path_required:
            sub.add_argument("path", type=Path, metavar="PATH", help="Megatron tree, gpt_layer_specs.py, HF model dir or config.json")
        else:
            sub.add_argument("path", type=Path, metavar="PATH", nargs="?", help="as for apply; default: the megatron-core this Python imports")
        sub.add_argument("--keep-mtp", action="store_true", help="config.json: leave num_nextn_predict_layers as it is")
        sub.add_argument("--json", action="store_true", help="print one JSON object instead of text")
        return sub

    apply = add("apply", "apply what the target needs (idempotent)")
    apply.add_argument("--dry-run", action="store_true", help="print the unified diff of every file and write nothing")
    apply.add_argument("--seed-edit", action="store_true", help="Megatron: also the how-to's column-parallel spec edit, with the rope-gradient fix")
    apply.add_argument("--rope-fix", action="store_true", help="Megatron: the rope-gradient fix even where the default layout does not need it")
    revert = add("revert", "restore the original bytes of every patched file from <file>.orig")
    revert.add_argument("--dry-run", action="store_true", help="print the diff that restoring would make")
    revert.add_argument("--force", action="store_true", help="restore even if the file changed since it was patched")
    add("status", "report version and each patch's state per file; exit 0 nothing missing, 1 needed, 2 unsupported", path_required=False)
    return parser


def _print_status(status: Status, advice: dict | None) -> None:
    version = f"  ({'megatron-core ' if status.target == 'megatron' else 'model_type '}{status.version or 'unknown'})"
    print(f"{status.target}: {status.path}{version}")
    print(f"  state: {status.state}")
    for patch in status.patches:
        where = f"{patch['path']}" + (f":{patch['line']}" if patch["line"] else "")
        print(f"  {patch['name']:<14} {patch['state']:<11} {where}")
        print(f"  {'':<14} {patch['message']}")
    if not status.patches:
        print(f"  {status.message}")
    if advice is not None:
        stack = advice["stack"]
        print(
            f"  stack: verl {stack['verl'] or '-'}, mbridge {stack['mbridge'] or '-'}, megatron-bridge {stack['megatron_bridge'] or '-'}"
            f" -> exporter {advice['exporter'] or 'unknown (verl not installed)'}"
        )
        for reason in advice["reasons"]:
            print(f"    {reason}")
        if advice["harmful"]:
            print(f"  HARMFUL: {'; '.join(advice['harmful'])}")
    if status.backup:
        print(f"  original kept in {status.backup}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        patch = resolve(args.path, keep_mtp=args.keep_mtp)
        if args.command == "status":
            status = patch.detect()
            advice = tree_advice(status)
            if args.json:
                print(json.dumps({**status.to_json(), "advice": advice}, indent=2))
            else:
                _print_status(status, advice)
            return status.exit_code
        if args.command == "apply" and isinstance(patch, MegatronTree):
            outcome = patch.apply(dry_run=args.dry_run, seed_edit=args.seed_edit, rope_fix=args.rope_fix)
        elif args.command == "apply":
            if args.seed_edit or args.rope_fix:
                raise PatchError(f"{patch.path}: --seed-edit and --rope-fix are for Megatron trees, not config.json")
            outcome = patch.apply(dry_run=args.dry_run)
        else:
            outcome = patch.revert(dry_run=args.dry_run, force=args.force)
    except (PatchError, OSError) as exc:
        message = str(exc)
        if isinstance(exc, OSError) and exc.filename:
            message = f"cannot write {exc.filename} ({exc.strerror}); make the directory writable or work on a copy"
        if getattr(args, "json", False):
            print(json.dumps({"error": message, "exit_code": 2}))
        else:
            print(f"patcher: error: {message}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"path": outcome.path, "changed": outcome.changed, "message": outcome.message, "diff": outcome.diff}, indent=2))
    else:
        if outcome.diff and args.dry_run:
            sys.stdout.write(outcome.diff)
        print(outcome.message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
