"""`launch`: command-line entry for the demo (and, as they land, planning and running GRPO)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from patcher import __version__

DESCRIPTION = "Plan and run verl GRPO for DeepSeek-V3-class models; `launch demo` runs the toolkit end to end."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="run the pipeline on generated inputs and print a table of steps, times and checks",
        description="Run every step of the toolkit on generated inputs (nothing is downloaded). "
        "The installed megatron-core is never modified: a scratch copy is patched.",
    )
    demo.add_argument("--out", type=Path, default=Path("demo-out"), help="scratch directory (default: demo-out)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from launch.demo import DemoFailure, format_table, run_demo

        try:
            results = run_demo(args.out)
        except DemoFailure as exc:
            print(f"launch demo: FAILED: {exc}", file=sys.stderr)
            return 1
        print("\n" + format_table(results))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
