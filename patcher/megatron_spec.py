"""libcst codemod: the how-to's edit, MLA's q/kv down projections made column-parallel in gpt_layer_specs.py.

From megatron-core 0.14 the Transformer Engine spec builds `linear_q_down_proj` and `linear_kv_down_proj`
with `backend.linear()` (a duplicated TELinear). The seed how-to rewrites them to column-parallel, the
layout of 0.12/0.13, to fix weight export at TP > 1. That layout takes MLA's column-parallel branch,
whose k_pos_emb gradient is wrong at TP > 1 without the rope-gradient fix (patcher/mla_rope_grad.py), so
`patcher` applies this edit only on request (--seed-edit) and always together with that fix; the export
problem itself is fixed by the export flag (patcher/te_export_flag.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import libcst as cst
import libcst.matchers as m
from libcst.metadata import PositionProvider

from patcher.cst_util import SourceParseError, code, parse, with_metadata

SUBMODULES_CLASS = "MLASelfAttentionSubmodules"
DOWN_PROJ_ARGS = ("linear_q_down_proj", "linear_kv_down_proj")
FUSED_DOWN_PROJ_ARG = "linear_qkv_down_proj"

DUPLICATED_BUILDER = "linear"
COLUMN_BUILDER = "column_parallel_linear"
COLUMN_BUILDERS = frozenset({"column_parallel_linear", "column_parallel_layer_norm_linear"})
DUPLICATED_CLASSES = {"TELinear": "TEColumnParallelLinear"}
COLUMN_CLASSES = frozenset({"TEColumnParallelLinear", "ColumnParallelLinear", "TELayerNormColumnParallelLinear"})

NEEDS_PATCH = "needs-patch"
COLUMN_PARALLEL = "column-parallel"
FUSED = "fused-column-parallel"
UNRECOGNISED = "unrecognised"


@dataclass(frozen=True)
class Site:
    """One down-projection argument inside an `MLASelfAttentionSubmodules(...)` call."""

    line: int
    function: str
    argument: str
    expression: str
    state: str
    note: str = ""

    @property
    def replacement(self) -> str | None:
        if self.state != NEEDS_PATCH:
            return None
        if self.expression in DUPLICATED_CLASSES:
            return DUPLICATED_CLASSES[self.expression]
        receiver, _, _ = self.expression.rpartition(f".{DUPLICATED_BUILDER}(")
        return f"{receiver}.{COLUMN_BUILDER}(" + self.expression[len(receiver) + len(DUPLICATED_BUILDER) + 2 :]


@dataclass
class SpecReport:
    """Everything found in one gpt_layer_specs.py: MLA calls, their down-projection sites, problems."""

    calls: int = 0
    sites: list[Site] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def needs_patch(self) -> bool:
        return any(site.state == NEEDS_PATCH for site in self.sites)

    @property
    def supported(self) -> bool:
        return self.calls > 0 and not self.problems and not any(s.state == UNRECOGNISED for s in self.sites)


SpecParseError = SourceParseError


def _builder_call(node: cst.BaseExpression) -> str | None:
    """`backend.linear()` -> "linear"; anything that is not `<expr>.<name>(...)` -> None."""
    if m.matches(node, m.Call(func=m.Attribute(attr=m.Name()))):
        return node.func.attr.value
    return None


def classify(value: cst.BaseExpression) -> str:
    """Classify a down-projection value that stands on its own (no variable lookup)."""
    builder = _builder_call(value)
    if builder == DUPLICATED_BUILDER:
        return NEEDS_PATCH
    if builder in COLUMN_BUILDERS:
        return COLUMN_PARALLEL
    if isinstance(value, cst.Name):
        if value.value in DUPLICATED_CLASSES:
            return NEEDS_PATCH
        if value.value in COLUMN_CLASSES:
            return COLUMN_PARALLEL
    return UNRECOGNISED


class _Scanner(cst.CSTVisitor):
    """Collect every down-projection site, with the enclosing function and local assignments."""

    METADATA_DEPENDENCIES = (PositionProvider,)

    def __init__(self) -> None:
        self.report = SpecReport()
        self._functions: list[str] = []
        self._assignments: list[dict[str, list[cst.BaseExpression]]] = [{}]

    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        self._functions.append(node.name.value)
        assignments: dict[str, list[cst.BaseExpression]] = {}
        for assign in m.findall(node, m.Assign(targets=[m.AssignTarget(target=m.Name())])):
            assignments.setdefault(assign.targets[0].target.value, []).append(assign.value)
        self._assignments.append(assignments)

    def leave_FunctionDef(self, original_node: cst.FunctionDef) -> None:
        self._functions.pop()
        self._assignments.pop()

    def visit_Call(self, node: cst.Call) -> None:
        if not m.matches(node.func, m.Name(SUBMODULES_CLASS) | m.Attribute(attr=m.Name(SUBMODULES_CLASS))):
            return
        self.report.calls += 1
        line = self.get_metadata(PositionProvider, node).start.line
        keywords = {arg.keyword.value: arg for arg in node.args if arg.keyword is not None}
        wanted = [name for name in (*DOWN_PROJ_ARGS, FUSED_DOWN_PROJ_ARG) if name in keywords]
        if not (set(DOWN_PROJ_ARGS) <= set(wanted) or FUSED_DOWN_PROJ_ARG in wanted):
            self.report.problems.append(
                f"line {line}: {SUBMODULES_CLASS}(...) has no {' / '.join(DOWN_PROJ_ARGS)} arguments "
                f"(found: {', '.join(keywords) or 'positional arguments only'})"
            )
            return
        for name in wanted:
            arg = keywords[name]
            self.report.sites.append(self._site(name, arg.value, self.get_metadata(PositionProvider, arg).start.line))

    def _site(self, name: str, value: cst.BaseExpression, line: int) -> Site:
        function = self._functions[-1] if self._functions else "<module>"
        expression = code(value)
        state = classify(value)
        if name == FUSED_DOWN_PROJ_ARG and state == UNRECOGNISED and isinstance(value, cst.Name):
            # megatron-core >= 0.17: `linear_qkv_down_proj=down_proj_linear`, a local chosen between
            # column_parallel_layer_norm_linear() (TE present) and linear(); only used with
            # mla_down_proj_fusion=True. Column-parallel whenever Transformer Engine is installed.
            builders = {
                _builder_call(call)
                for assigned in self._assignments[-1].get(value.value, [])
                for call in m.findall(assigned, m.Call(func=m.Attribute(attr=m.Name())))
            }
            if "column_parallel_layer_norm_linear" in builders and builders <= {
                "column_parallel_layer_norm_linear",
                DUPLICATED_BUILDER,
            }:
                return Site(
                    line,
                    function,
                    name,
                    expression,
                    FUSED,
                    "fused q/kv down projection (mla_down_proj_fusion): column_parallel_layer_norm_linear() "
                    "with Transformer Engine; left as is",
                )
        return Site(line, function, name, expression, state)


class _Rewriter(cst.CSTTransformer):
    """Replace only the down-projection values that need it, and import the new class if needed."""

    def __init__(self, add_import: bool) -> None:
        self._depth = 0
        self._add_import = add_import

    def visit_Call(self, node: cst.Call) -> None:
        if m.matches(node.func, m.Name(SUBMODULES_CLASS) | m.Attribute(attr=m.Name(SUBMODULES_CLASS))):
            self._depth += 1

    def leave_Call(self, original_node: cst.Call, updated_node: cst.Call) -> cst.Call:
        if m.matches(original_node.func, m.Name(SUBMODULES_CLASS) | m.Attribute(attr=m.Name(SUBMODULES_CLASS))):
            self._depth -= 1
        return updated_node

    def leave_Arg(self, original_node: cst.Arg, updated_node: cst.Arg) -> cst.Arg:
        if self._depth != 1 or original_node.keyword is None:
            return updated_node
        if original_node.keyword.value not in (*DOWN_PROJ_ARGS, FUSED_DOWN_PROJ_ARG):
            return updated_node
        value = updated_node.value
        if classify(value) != NEEDS_PATCH:
            return updated_node
        if isinstance(value, cst.Name):
            return updated_node.with_changes(value=value.with_changes(value=DUPLICATED_CLASSES[value.value]))
        return updated_node.with_changes(
            value=value.with_changes(func=value.func.with_changes(attr=cst.Name(COLUMN_BUILDER)))
        )

    def leave_ImportFrom(self, original_node: cst.ImportFrom, updated_node: cst.ImportFrom) -> cst.ImportFrom:
        if not self._add_import or isinstance(updated_node.names, cst.ImportStar):
            return updated_node
        names = list(updated_node.names)
        imported = [alias.evaluated_name for alias in names]
        for old, new in DUPLICATED_CLASSES.items():
            if old not in imported or new in imported:
                continue
            index = imported.index(old)
            # The new name follows the old one and takes its separator; the old one takes the
            # separator used between earlier names, so a multi-line import stays aligned.
            separator = names[index - 1].comma if index > 0 else cst.MaybeSentinel.DEFAULT
            names.insert(index + 1, cst.ImportAlias(name=cst.Name(new), comma=names[index].comma))
            names[index] = names[index].with_changes(comma=separator)
            self._add_import = False
            return updated_node.with_changes(names=names)
        return updated_node


@lru_cache(maxsize=32)
def scan(source: str) -> SpecReport:
    """Report every MLA down-projection site in a gpt_layer_specs.py source text."""
    scanner = _Scanner()
    with_metadata(source).visit(scanner)
    return scanner.report


def _binds(module: cst.Module, name: str) -> bool:
    imported = m.findall(module, m.ImportAlias(name=m.Name(name), asname=None))
    assigned = m.findall(module, m.AssignTarget(target=m.Name(name)))
    return bool(imported or assigned)


@lru_cache(maxsize=32)
def rewrite(source: str) -> str:
    """Return `source` with every duplicated down projection made column-parallel.

    Only the matched expressions change (plus the import of TEColumnParallelLinear where the class
    form is rewritten and the file does not import it yet); formatting and comments are kept.
    """
    module = parse(source)
    uses_class_form = any(
        site.state == NEEDS_PATCH and site.expression in DUPLICATED_CLASSES for site in scan(source).sites
    )
    add_import = uses_class_form and not all(_binds(module, new) for new in DUPLICATED_CLASSES.values())
    return module.visit(_Rewriter(add_import)).code
