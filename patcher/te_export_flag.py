"""libcst codemod: mark duplicated `TELinear` weights `tensor_model_parallel=False` (megatron-core 0.14-0.16).

Why: Transformer Engine tags every `Linear` weight `tensor_model_parallel=True` (partition dim 0),
also when Megatron builds it with `parallel_mode="duplicated"` (TE then sees no parallel mode). From
megatron-core 0.14 the TE spec builds MLA's q/kv down projections that way, so exporters that gather
parameters by that flag (verl's per-tensor generator, mbridge <= 0.15.1) concatenate TP identical copies
and vLLM receives `[TP * q_lora_rank, hidden]`. megatron-core 0.17 clears the flag in the duplicated
branch of `TELinear.__init__`; this codemod adds that one statement to older releases, right after
the branch's `setattr(param, "sequence_parallel", ...)`, where 0.17 has it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import libcst as cst
import libcst.matchers as m
from libcst.metadata import PositionProvider

from patcher.cst_util import SourceParseError, parse, statement_matches, with_metadata

CLASS_NAME = "TELinear"
FLAG = "tensor_model_parallel"

NEEDS_PATCH = "needs-patch"
PRESENT = "present"
UNRECOGNISED = "unrecognised"

COMMENT = (
    "# Not split across TP ranks: clear the flag Transformer Engine set, so exporters\n"
    "# that gather by it take one copy (as megatron-core 0.17 does; added by `patcher`).\n"
)

_PARALLEL_MODE_IS_DUPLICATED = m.Comparison(
    left=m.Name("parallel_mode"),
    comparisons=[m.ComparisonTarget(operator=m.Equal(), comparator=m.SimpleString('"duplicated"') | m.SimpleString("'duplicated'"))],
)


def _setattr_on_param(attribute: str, value: m.BaseMatcherNode | None = None) -> m.Expr:
    """`setattr(param, "<attribute>", <value>)` as a statement, either quote style."""
    return m.Expr(
        value=m.Call(
            func=m.Name("setattr"),
            args=[
                m.Arg(value=m.Name("param"), keyword=None),
                m.Arg(value=m.SimpleString(f'"{attribute}"') | m.SimpleString(f"'{attribute}'"), keyword=None),
                m.Arg(value=value or m.DoNotCare(), keyword=None),
            ],
        )
    )


_SEQUENCE_PARALLEL_SETATTR = _setattr_on_param("sequence_parallel")
_FLAG_SETATTR = _setattr_on_param(FLAG)
_FLAG_CLEARED = _setattr_on_param(FLAG, m.Name("False"))


@dataclass(frozen=True)
class Report:
    """What the duplicated branch of `TELinear.__init__` does with the flag."""

    state: str
    line: int | None
    detail: str


def _duplicated_branches(init: cst.FunctionDef) -> list[cst.If]:
    """`if parallel_mode == "duplicated":` blocks inside `for param in self.parameters():` loops."""
    parameter_loops = m.findall(
        init,
        m.For(
            target=m.Name("param"),
            iter=m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name("parameters")), args=[]),
        ),
    )
    return [branch for loop in parameter_loops for branch in m.findall(loop, m.If(test=_PARALLEL_MODE_IS_DUPLICATED))]


def _te_linear_init(module: cst.Module) -> cst.FunctionDef | None:
    for node in module.body:
        if m.matches(node, m.ClassDef(name=m.Name(CLASS_NAME))):
            for statement in node.body.body:
                if m.matches(statement, m.FunctionDef(name=m.Name("__init__"))):
                    return statement
    return None


@lru_cache(maxsize=32)
def scan(source: str) -> Report:
    """Find the duplicated branch of `TELinear.__init__` and say whether it clears the flag."""
    wrapper = with_metadata(source)
    positions = wrapper.resolve(PositionProvider)
    init = _te_linear_init(wrapper.module)
    if init is None:
        return Report(UNRECOGNISED, None, f"no class {CLASS_NAME} with an __init__ at module level")
    line = positions[init].start.line
    branches = _duplicated_branches(init)
    if len(branches) != 1:
        return Report(
            UNRECOGNISED,
            line,
            f'{CLASS_NAME}.__init__ has {len(branches)} `if parallel_mode == "duplicated":` blocks inside '
            "`for param in self.parameters():` (expected exactly one)",
        )
    branch = branches[0]
    line = positions[branch].start.line
    body = list(branch.body.body)
    if any(statement_matches(statement, _FLAG_CLEARED) for statement in body):
        return Report(PRESENT, line, f"the duplicated branch already sets {FLAG}=False")
    if any(statement_matches(statement, _FLAG_SETATTR) for statement in body):
        return Report(UNRECOGNISED, line, f"the duplicated branch sets {FLAG} to something other than False")
    if not any(statement_matches(statement, _SEQUENCE_PARALLEL_SETATTR) for statement in body):
        return Report(UNRECOGNISED, line, 'the duplicated branch has no setattr(param, "sequence_parallel", ...)')
    return Report(NEEDS_PATCH, line, f"duplicated TELinear weights keep Transformer Engine's {FLAG}=True")


class _AddFlag(cst.CSTTransformer):
    def __init__(self, branch: cst.If) -> None:
        self._branch = branch

    def leave_If(self, original_node: cst.If, updated_node: cst.If) -> cst.If:
        if original_node is not self._branch:
            return updated_node
        body = list(updated_node.body.body)
        anchor = next(i for i, statement in enumerate(body) if statement_matches(statement, _SEQUENCE_PARALLEL_SETATTR))
        quote = body[anchor].body[0].value.args[1].value.value[0]
        comment_lines = [cst.EmptyLine(comment=cst.Comment(text)) for text in COMMENT.splitlines()]
        added = cst.parse_statement(f"setattr(param, {quote}{FLAG}{quote}, False)\n").with_changes(leading_lines=comment_lines)
        body.insert(anchor + 1, added)
        return updated_node.with_changes(body=updated_node.body.with_changes(body=body))


@lru_cache(maxsize=32)
def rewrite(source: str) -> str:
    """Return `source` with the flag cleared in the duplicated branch; unchanged if not needed."""
    report = scan(source)
    if report.state != NEEDS_PATCH:
        return source
    module = parse(source)
    branch = _duplicated_branches(_te_linear_init(module))[0]
    return module.visit(_AddFlag(branch)).code


__all__ = ["NEEDS_PATCH", "PRESENT", "UNRECOGNISED", "Report", "SourceParseError", "rewrite", "scan"]
