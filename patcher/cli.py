"""`patcher`: command-line entry that parses arguments and calls patcher.patches."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from patcher import __version__
from patcher.patches import PatchError, Status, resolve

DESCRIPTION = """\
Patch Megatron-Core and DeepSeek-V3 configs for verl GRPO.

Megatron: in megatron/core/models/gpt/gpt_layer_specs.py, every MLASelfAttentionSubmodules(...)
call gets column-parallel q/kv down projections (backend.linear() -> backend.column_parallel_linear(),
TELinear -> TEColumnParallelLinear). Needed on megatron-core 0.14 and newer for TP > 1 weight
resharding to vLLM; 0.12 and 0.13 are reported as not needed.

HF model dir: config.json loses quantization_config and gets num_nextn_predict_layers: 0.

PATH may be a Megatron-LM checkout, its megatron/ dir, a site-packages dir, gpt_layer_specs.py,
a HF model dir or its config.json. The original is kept once as <file>.orig for an exact revert.
"""

EPILOG = """\
exit codes:
  0  done (status: applied or not needed)
  1  status only: the patch is needed
  2  unsupported file or structure, or an error; nothing was written

examples:
  patcher status                           # the megatron-core this Python imports
  patcher apply --dry-run /opt/Megatron-LM # show the diff, write nothing
  patcher apply /opt/Megatron-LM
  patcher apply /models/DeepSeek-V3-0324   # config.json
  patcher revert /opt/Megatron-LM
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

    apply = add("apply", "apply the patch (idempotent)")
    apply.add_argument("--dry-run", action="store_true", help="print the unified diff and write nothing")
    revert = add("revert", "restore the original bytes from <file>.orig")
    revert.add_argument("--dry-run", action="store_true", help="print the diff that restoring would make")
    revert.add_argument("--force", action="store_true", help="restore even if the file changed since it was patched")
    add("status", "report version, state and every site; exit 0 applied/not needed, 1 needed, 2 unsupported", path_required=False)
    return parser


def _print_status(status: Status) -> None:
    version = f"  ({'megatron-core ' if status.target == 'megatron' else 'model_type '}{status.version or 'unknown'})"
    print(f"{status.target}: {status.path}{version}")
    print(f"  state: {status.state}: {status.message}")
    for site in status.sites:
        change = f"  ->  {site['replacement']}" if site["replacement"] else ""
        print(f"  line {site['line']:>4}  {site['function']}: {site['argument']}={site['expression']}  [{site['state']}]{change}")
        if site["note"]:
            print(f"             {site['note']}")
    if status.backup:
        print(f"  original kept in {status.backup}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        patch = resolve(args.path, keep_mtp=args.keep_mtp)
        if args.command == "status":
            status = patch.detect()
            if args.json:
                print(json.dumps(status.to_json(), indent=2))
            else:
                _print_status(status)
            return status.exit_code
        if args.command == "apply":
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
