"""libcst helpers shared by the Megatron source codemods."""

from __future__ import annotations

from functools import lru_cache

import libcst as cst
import libcst.matchers as m
from libcst.metadata import MetadataWrapper


class SourceParseError(ValueError):
    """The file is not valid Python; the message names the line and column."""


@lru_cache(maxsize=32)
def parse(source: str) -> cst.Module:
    """Parse once per distinct text: status, dry run, apply and revert all read the same files and
    libcst takes about a second for megatron's larger modules. Trees are immutable, so sharing is safe."""
    try:
        return cst.parse_module(source)
    except cst.ParserSyntaxError as exc:
        raise SourceParseError(f"line {exc.raw_line} column {exc.raw_column}: not valid Python ({exc.message})") from exc


def statement_matches(statement: cst.BaseStatement, matcher: m.BaseMatcherNode) -> bool:
    """Whether `statement` is a one-statement line (`x = f(y)`, `f(x)`) that `matcher` matches."""
    return (
        isinstance(statement, cst.SimpleStatementLine)
        and len(statement.body) == 1
        and m.matches(statement.body[0], matcher)
    )


def code(node: cst.CSTNode) -> str:
    return cst.Module(body=[]).code_for_node(node)


def with_metadata(source: str) -> MetadataWrapper:
    """The cached tree wrapped for position lookups (no deep copy: nothing here mutates it)."""
    return MetadataWrapper(parse(source), unsafe_skip_copy=True)
