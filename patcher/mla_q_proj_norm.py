"""libcst codemod: no query norm fused into MLA's `linear_q_proj` when there is no query LoRA (megatron-core 0.19).

Why (issue #21 item 3, Megatron-Bridge #5261): DeepSeek-V2(-Lite) and Moonlight (`q_lora_rank: null`)
project the query straight from the input layernorm's output (`self_attn.q_proj`); HF has no norm there.
`qk_layernorm=True` is still needed for the KV norm (`kv_a_layernorm`). Up to 0.18 MLA built
`linear_q_proj` from the spec (a plain column-parallel linear). megatron-core 0.19 resolves the MLA
projections in `QKNormConfigResolver` (transformer/mla_qk_norm_config.py), which
  - with qk_layernorm and no query LoRA always returns the backend's fused norm+linear for
    `linear_q_proj` (TELayerNormColumnParallelLinear: an extra RMSNorm, checkpoint key
    `linear_q_proj.layer_norm_weight`), whatever the spec says; with the local spec (no fused
    class) it raises RuntimeError instead, and
  - before that refuses the local spec's standalone `q_layernorm` when there is no query LoRA
    (ValueError), although MLA builds and applies `q_layernorm` only with a query LoRA.
No config field or spec argument avoids either: `qk_layernorm=False` also drops the KV norm.

This codemod restores 0.18's behaviour for models without a query LoRA, in the resolver only:
    linear_q_proj_cls = self.submodules.linear_q_proj or self.linear_impl      # was: the fused default
and the `if not self.has_q_lora and not self._is_trivial(self.submodules.q_layernorm): raise` check
is dropped (the unused q_layernorm spec is ignored, as MLASelfAttention never builds it). A spec that
asks for a fused `linear_q_proj` explicitly still gets it. Models with a query LoRA are untouched.
Releases without mla_qk_norm_config.py (<= 0.18) do not need it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import libcst as cst
import libcst.matchers as m
from libcst.metadata import PositionProvider

from patcher.cst_util import SourceParseError, parse, statement_matches, with_metadata

CLASS_NAME = "QKNormConfigResolver"
RESOLVE_MLA = "_resolve_mla_qk_layernorm"
COMMON_CHECKS = "_reject_common_spec_conflicts"
TARGET = "linear_q_proj_cls"

NEEDS_PATCH = "needs-patch"
PRESENT = "present"
UNRECOGNISED = "unrecognised"

PLAIN_COMMENT = (
    "# No query LoRA: the spec's linear_q_proj, no norm fused in (HF DeepSeek-V2/Moonlight have none\n"
    "# before q_proj), as up to megatron-core 0.18 (added by `patcher`).\n"
)
DROPPED_COMMENT = (
    "# No query LoRA: a q_layernorm in the spec is not built (MLA builds it only with a query LoRA);\n"
    "# not refused, as up to megatron-core 0.18 (check removed by `patcher`).\n"
)


def _self_attr(*names: str) -> m.Attribute:
    """`self.a.b...` as a matcher."""
    node: m.BaseExpressionMatcherNode = m.Name("self")
    for name in names:
        node = m.Attribute(value=node, attr=m.Name(name))
    return node


def _quoted(text: str) -> m.SimpleString:
    return m.SimpleString(f'"{text}"') | m.SimpleString(f"'{text}'")


_HAS_Q_LORA = _self_attr("has_q_lora")
# 0.19: linear_q_proj_cls = self._mla_fused_linear_or_default(self.submodules.linear_q_proj, "linear_q_proj")
_FUSED_DEFAULT = m.Assign(
    targets=[m.AssignTarget(target=m.Name(TARGET))],
    value=m.Call(
        func=_self_attr("_mla_fused_linear_or_default"),
        args=[m.Arg(value=_self_attr("submodules", "linear_q_proj"), keyword=None), m.Arg(value=_quoted("linear_q_proj"), keyword=None)],
    ),
)
# patched (and 0.19's disabled-norm branch): linear_q_proj_cls = self.submodules.linear_q_proj or self.linear_impl
PLAIN_SOURCE = f"{TARGET} = self.submodules.linear_q_proj or self.linear_impl\n"
_PLAIN = m.Assign(
    targets=[m.AssignTarget(target=m.Name(TARGET))],
    value=m.BooleanOperation(left=_self_attr("submodules", "linear_q_proj"), operator=m.Or(), right=_self_attr("linear_impl")),
)
# 0.19: if not self.has_q_lora and not self._is_trivial(self.submodules.q_layernorm): self._raise_unused_q_norm()
_UNUSED_Q_NORM_CHECK = m.If(
    test=m.BooleanOperation(
        left=m.UnaryOperation(operator=m.Not(), expression=_HAS_Q_LORA),
        operator=m.And(),
        right=m.UnaryOperation(
            operator=m.Not(),
            expression=m.Call(func=_self_attr("_is_trivial"), args=[m.Arg(value=_self_attr("submodules", "q_layernorm"))]),
        ),
    ),
    body=m.IndentedBlock(body=[m.SimpleStatementLine(body=[m.Expr(value=m.Call(func=_self_attr("_raise_unused_q_norm"), args=[]))])]),
    orelse=None,
)
_ANY_Q_NORM_REFUSAL = m.Call(func=_self_attr("_raise_unused_q_norm"))


@dataclass(frozen=True)
class Report:
    """How `QKNormConfigResolver` builds `linear_q_proj` without a query LoRA."""

    state: str
    line: int | None
    detail: str


@dataclass(frozen=True)
class _Sites:
    assignment: cst.SimpleStatementLine  # `linear_q_proj_cls = ...` in the no-query-LoRA branch
    check: cst.If | None  # the unused-q-norm refusal, None once removed


def _method(resolver: cst.ClassDef, name: str) -> cst.FunctionDef | None:
    for statement in resolver.body.body:
        if m.matches(statement, m.FunctionDef(name=m.Name(name))):
            return statement
    return None


def _resolver(module: cst.Module) -> cst.ClassDef | None:
    for node in module.body:
        if m.matches(node, m.ClassDef(name=m.Name(CLASS_NAME))):
            return node
    return None


def _no_lora_assignments(method: cst.FunctionDef) -> list[cst.SimpleStatementLine]:
    """`linear_q_proj_cls = ...` lines in the `else:` of every `if self.has_q_lora:` of the method."""
    found = []
    for branch in m.findall(method, m.If(test=_HAS_Q_LORA, orelse=m.Else())):
        for statement in branch.orelse.body.body:
            if statement_matches(statement, m.Assign(targets=[m.AssignTarget(target=m.Name(TARGET))])):
                found.append(statement)
    return found


def _locate(module: cst.Module) -> tuple[str, str, cst.CSTNode | None, _Sites | None]:
    """(state, detail, node for the line number, sites) of the resolver in `module`."""
    resolver = _resolver(module)
    if resolver is None:
        return UNRECOGNISED, f"no class {CLASS_NAME} at module level", None, None
    resolve_mla = _method(resolver, RESOLVE_MLA)
    common = _method(resolver, COMMON_CHECKS)
    if resolve_mla is None or common is None:
        missing = " and ".join(name for name, node in ((RESOLVE_MLA, resolve_mla), (COMMON_CHECKS, common)) if node is None)
        return UNRECOGNISED, f"{CLASS_NAME} has no {missing}", resolver, None
    assignments = _no_lora_assignments(resolve_mla)
    if len(assignments) != 1:
        return UNRECOGNISED, (
            f"{CLASS_NAME}.{RESOLVE_MLA} has {len(assignments)} `{TARGET} = ...` in the `else:` of `if self.has_q_lora:` "
            "(expected exactly one)"
        ), resolve_mla, None
    assignment = assignments[0]
    checks = [statement for statement in common.body.body if m.matches(statement, _UNUSED_Q_NORM_CHECK)]
    stray = len(m.findall(common, _ANY_Q_NORM_REFUSAL)) - len(checks)
    if len(checks) > 1 or stray:
        return UNRECOGNISED, f"{CLASS_NAME}.{COMMON_CHECKS} refuses an unused q_layernorm in a form this patcher does not know", common, None
    check = checks[0] if checks else None
    sites = _Sites(assignment, check)
    if statement_matches(assignment, _FUSED_DEFAULT) and check is not None:
        return NEEDS_PATCH, (
            "without a query LoRA, qk_layernorm fuses a norm into linear_q_proj (TE: linear_q_proj.layer_norm_weight, "
            "a norm HF DeepSeek-V2/Moonlight do not have; local spec: refused)"
        ), assignment, sites
    if statement_matches(assignment, _PLAIN) and check is None:
        return PRESENT, "without a query LoRA, linear_q_proj is the spec's linear (no fused norm)", assignment, sites
    return UNRECOGNISED, (
        f"{CLASS_NAME}: `{cst.Module(body=[]).code_for_node(assignment).strip()}` with the unused-q-norm check "
        f"{'present' if check is not None else 'absent'} is not a form this patcher knows"
    ), assignment, None


@lru_cache(maxsize=32)
def scan(source: str) -> Report:
    """Find how the resolver builds `linear_q_proj` without a query LoRA."""
    wrapper = with_metadata(source)
    positions = wrapper.resolve(PositionProvider)
    state, detail, node, _ = _locate(wrapper.module)
    return Report(state, positions[node].start.line if node is not None else None, detail)


def _comment_lines(text: str) -> list[cst.EmptyLine]:
    return [cst.EmptyLine(comment=cst.Comment(line)) for line in text.splitlines()]


class _PlainQProj(cst.CSTTransformer):
    def __init__(self, sites: _Sites) -> None:
        self._sites = sites

    def leave_SimpleStatementLine(self, original_node: cst.SimpleStatementLine, updated_node: cst.SimpleStatementLine) -> cst.SimpleStatementLine:
        if original_node is not self._sites.assignment:
            return updated_node
        plain = cst.parse_statement(PLAIN_SOURCE)
        return plain.with_changes(leading_lines=[*updated_node.leading_lines, *_comment_lines(PLAIN_COMMENT)])

    def leave_FunctionDef(self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef) -> cst.FunctionDef:
        if self._sites.check is None or not any(statement is self._sites.check for statement in original_node.body.body):
            return updated_node
        body = list(updated_node.body.body)
        index = next(i for i, statement in enumerate(original_node.body.body) if statement is self._sites.check)
        removed = body.pop(index)
        comments = [*removed.leading_lines, *_comment_lines(DROPPED_COMMENT)]
        if index < len(body):  # the comment goes on the next statement (0.19: the KV checks)
            body[index] = body[index].with_changes(leading_lines=[*comments, *body[index].leading_lines])
        else:
            body.append(cst.SimpleStatementLine(body=[cst.Pass()], leading_lines=comments))
        return updated_node.with_changes(body=updated_node.body.with_changes(body=body))


@lru_cache(maxsize=32)
def rewrite(source: str) -> str:
    """Return `source` with a plain `linear_q_proj` without a query LoRA; unchanged unless scan says needs-patch."""
    if scan(source).state != NEEDS_PATCH:
        return source
    module = parse(source)
    _, _, _, sites = _locate(module)
    return module.visit(_PlainQProj(sites)).code


__all__ = ["NEEDS_PATCH", "PRESENT", "UNRECOGNISED", "Report", "SourceParseError", "rewrite", "scan"]
