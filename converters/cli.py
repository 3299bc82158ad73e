"""`convert`: command-line entry for the checkpoint and data converters."""

from __future__ import annotations

import argparse
import sys

from patcher import __version__

DESCRIPTION = "Convert DeepSeek-V3-class checkpoints and data for verl GRPO on Megatron-Core."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    return 2


if __name__ == "__main__":
    sys.exit(main())
