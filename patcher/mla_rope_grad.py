"""libcst codemod: sum the `k_pos_emb` gradient over TP ranks in MLA's column-parallel branch.

Why (Megatron-LM issue #1699): when `linear_kv_down_proj` is column-parallel, `MultiLatentAttention`
gathers its output with `gather_from_tensor_model_parallel_region` and splits `k_pos_emb` (the shared
RoPE key) off the full width. Every TP rank then uses that same `k_pos_emb` for its own heads only,
and the gather's backward is a plain split, so each rank's gradient of the RoPE columns holds only its
own heads' part: the down projection's weight gradient and the input gradient through it are wrong
at TP > 1. Passing `k_pos_emb` through `copy_to_tensor_model_parallel_region` (identity forward,
all-reduce over the TP group backward) makes the gradient the sum over every rank's heads, as at TP=1.

The branch is recognised in every release from 0.12 to 0.19 (the fused q/kv down projection of 0.17+
goes through it too); anything else there is refused.

    if kv_combined.size(-1) != <full width>:
        kv_combined = gather_from_tensor_model_parallel_region(kv_combined[, group=...])
        kv_compressed, k_pos_emb = torch.split(kv_combined, [...], dim=-1)
        k_pos_emb = copy_to_tensor_model_parallel_region(k_pos_emb[, group=...])   # added
        if self.config.sequence_parallel:
            kv_compressed = scatter_to_sequence_parallel_region(kv_compressed)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import libcst as cst
import libcst.matchers as m
from libcst.metadata import PositionProvider

from patcher.cst_util import SourceParseError, parse, statement_matches, with_metadata

GATHER = "gather_from_tensor_model_parallel_region"
REDUCE_BACKWARD = "copy_to_tensor_model_parallel_region"
MAPPINGS_MODULE = "megatron.core.tensor_parallel.mappings"

NEEDS_PATCH = "needs-patch"
PRESENT = "present"
UNRECOGNISED = "unrecognised"

COMMENT = (
    "# The gather's backward only splits: each TP rank's k_pos_emb gradient would hold only\n"
    "# its own heads. Sum it over TP, as at TP=1 (Megatron-LM #1699; added by `patcher`).\n"
)


@dataclass(frozen=True)
class Report:
    """The column-parallel branch of MultiLatentAttention and whether its k_pos_emb gradient is summed."""

    state: str
    line: int | None
    detail: str


def _gather_assign(name: str) -> m.Assign:
    return m.Assign(
        targets=[m.AssignTarget(target=m.Name(name))],
        value=m.Call(func=m.Name(GATHER), args=[m.Arg(value=m.Name(name), keyword=None), m.ZeroOrMore(m.Arg(keyword=m.Name()))]),
    )


def _split_assign(combined: str) -> m.Assign:
    return m.Assign(
        targets=[m.AssignTarget(target=m.Tuple(elements=[m.Element(m.Name()), m.Element(m.Name())]))],
        value=m.Call(
            func=m.Attribute(value=m.Name("torch"), attr=m.Name("split")),
            args=[m.Arg(value=m.Name(combined), keyword=None), m.ZeroOrMore()],
        ),
    )


def _reduce_assign(name: str) -> m.Assign:
    return m.Assign(
        targets=[m.AssignTarget(target=m.Name(name))],
        value=m.Call(func=m.Name(REDUCE_BACKWARD), args=[m.Arg(value=m.Name(name), keyword=None), m.ZeroOrMore(m.Arg(keyword=m.Name()))]),
    )


def _sequence_parallel_scatter(name: str) -> m.If:
    """`if self.config.sequence_parallel: <name> = scatter_to_sequence_parallel_region(<name>)`."""
    return m.If(
        test=m.Attribute(value=m.Attribute(value=m.Name("self"), attr=m.Name("config")), attr=m.Name("sequence_parallel")),
        body=m.IndentedBlock(
            body=[
                m.SimpleStatementLine(
                    body=[
                        m.Assign(
                            targets=[m.AssignTarget(target=m.Name(name))],
                            value=m.Call(func=m.Name("scatter_to_sequence_parallel_region"), args=[m.Arg(value=m.Name(name))]),
                        )
                    ]
                )
            ]
        ),
        orelse=None,
    )


@dataclass(frozen=True)
class _Branch:
    node: cst.If
    combined: str
    compressed: str
    pos_emb: str
    gather: cst.Call


def _width_check(combined: str) -> m.Comparison:
    """`<combined>.size(-1) != ...`: the test that opens the column-parallel branch."""
    return m.Comparison(
        left=m.Call(func=m.Attribute(value=m.Name(combined), attr=m.Name("size"))),
        comparisons=[m.ComparisonTarget(operator=m.NotEqual())],
    )


def _classify(branch: cst.If) -> tuple[str, str, _Branch | None]:
    """(state, detail, parts) of an `if` whose body starts with `X = gather_from_tensor_model_parallel_region(X)`."""
    body = list(branch.body.body)
    combined = body[0].body[0].targets[0].target.value
    if not m.matches(branch.test, _width_check(combined)):
        return UNRECOGNISED, f"the gather of {combined} is not under `if {combined}.size(-1) != ...:`", None
    if len(body) < 2 or not statement_matches(body[1], _split_assign(combined)):
        return UNRECOGNISED, f"the gather of {combined} is not followed by `a, b = torch.split({combined}, ...)`", None
    compressed, pos_emb = (element.value.value for element in body[1].body[0].targets[0].target.elements)
    parts = _Branch(branch, combined, compressed, pos_emb, body[0].body[0].value)
    rest = body[2:]
    fixed = bool(rest) and statement_matches(rest[0], _reduce_assign(pos_emb))
    if fixed:
        rest = rest[1:]
    if rest and m.matches(rest[0], _sequence_parallel_scatter(compressed)):
        rest = rest[1:]
    if rest:
        return UNRECOGNISED, f"the column-parallel branch has statements this patcher does not know after the split of {combined}", None
    if fixed:
        return PRESENT, f"{pos_emb} goes through {REDUCE_BACKWARD} (its gradient is summed over TP ranks)", parts
    return NEEDS_PATCH, f"{pos_emb}'s gradient holds only this TP rank's heads (gather backward is a split)", parts


def _opens_with_gather(branch: cst.If) -> bool:
    """Whether the `if` body starts with `X = gather_from_tensor_model_parallel_region(X, ...)`."""
    body = branch.body.body if isinstance(branch.body, cst.IndentedBlock) else ()
    if not body or not statement_matches(body[0], m.Assign(targets=[m.AssignTarget(target=m.Name())])):
        return False
    return statement_matches(body[0], _gather_assign(body[0].body[0].targets[0].target.value))


def _k_pos_emb_branches(module: cst.Module) -> list[cst.If]:
    """Gather-first branches that split a tensor into two (q's gather has no split and is fine)."""
    return [
        branch
        for branch in m.findall(module, m.If())
        if _opens_with_gather(branch)
        and len(branch.body.body) > 1 and statement_matches(branch.body.body[1], m.Assign(targets=[m.AssignTarget(target=m.Tuple())]))
    ]


@lru_cache(maxsize=32)
def scan(source: str) -> Report:
    """Locate the column-parallel branch and say whether its k_pos_emb gradient is summed over TP."""
    wrapper = with_metadata(source)
    positions = wrapper.resolve(PositionProvider)
    module = wrapper.module
    if not m.findall(module, m.ClassDef(name=m.Name("MultiLatentAttention"))):
        return Report(UNRECOGNISED, None, "no class MultiLatentAttention")
    branches = _k_pos_emb_branches(module)
    if len(branches) != 1:
        gathers = m.findall(module, m.Call(func=m.Name(GATHER)))
        lines = ", ".join(str(positions[call].start.line) for call in gathers) or "none"
        return Report(
            UNRECOGNISED,
            None,
            f"expected one column-parallel branch that gathers and splits kv_combined, found {len(branches)} "
            f"({GATHER} calls at lines {lines})",
        )
    state, detail, _ = _classify(branches[0])
    line = positions[branches[0]].start.line
    if state == NEEDS_PATCH and not (_binds(module, REDUCE_BACKWARD) or _imports_gather_from_mappings(module)):
        return Report(UNRECOGNISED, line, f"{GATHER} is not imported by name from {MAPPINGS_MODULE}; nowhere to import {REDUCE_BACKWARD}")
    return Report(state, line, detail)


class _SumGradient(cst.CSTTransformer):
    def __init__(self, parts: _Branch, add_import: bool) -> None:
        self._parts = parts
        self._add_import = add_import

    def leave_If(self, original_node: cst.If, updated_node: cst.If) -> cst.If:
        if original_node is not self._parts.node:
            return updated_node
        pos_emb = self._parts.pos_emb
        keywords = list(self._parts.gather.args[1:])
        call = cst.Call(func=cst.Name(REDUCE_BACKWARD), args=[cst.Arg(cst.Name(pos_emb)), *keywords])
        statement = cst.SimpleStatementLine(
            body=[cst.Assign(targets=[cst.AssignTarget(cst.Name(pos_emb))], value=call)],
            leading_lines=[cst.EmptyLine(comment=cst.Comment(text)) for text in COMMENT.splitlines()],
        )
        body = list(updated_node.body.body)
        body.insert(2, statement)
        return updated_node.with_changes(body=updated_node.body.with_changes(body=body))

    def leave_ImportFrom(self, original_node: cst.ImportFrom, updated_node: cst.ImportFrom) -> cst.ImportFrom:
        if not self._add_import or isinstance(updated_node.names, cst.ImportStar):
            return updated_node
        names = list(updated_node.names)
        if _dotted(updated_node) != MAPPINGS_MODULE or not any(alias.evaluated_name == GATHER for alias in names):
            return updated_node
        # Goes first (alphabetical in every release) and takes the first name's separator, so a
        # parenthesised one-name-per-line import stays one name per line.
        names.insert(0, cst.ImportAlias(name=cst.Name(REDUCE_BACKWARD), comma=names[0].comma if len(names) > 1 else cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))))
        self._add_import = False
        return updated_node.with_changes(names=names)


def _dotted(node: cst.ImportFrom) -> str:
    return cst.Module(body=[]).code_for_node(node.module) if node.module is not None else ""


def _imports_gather_from_mappings(module: cst.Module) -> bool:
    return any(
        _dotted(node) == MAPPINGS_MODULE
        and not isinstance(node.names, cst.ImportStar)
        and any(alias.evaluated_name == GATHER for alias in node.names)
        for node in m.findall(module, m.ImportFrom())
    )


def _binds(module: cst.Module, name: str) -> bool:
    return bool(m.findall(module, m.ImportAlias(name=m.Name(name), asname=None)))


@lru_cache(maxsize=32)
def rewrite(source: str) -> str:
    """Return `source` with `k_pos_emb` summed over TP in backward; unchanged unless scan says needs-patch."""
    if scan(source).state != NEEDS_PATCH:
        return source
    module = parse(source)
    _, _, parts = _classify(_k_pos_emb_branches(module)[0])
    transformer = _SumGradient(parts, add_import=not _binds(module, REDUCE_BACKWARD))
    return module.visit(transformer).code


__all__ = ["NEEDS_PATCH", "PRESENT", "UNRECOGNISED", "Report", "SourceParseError", "rewrite", "scan"]
