"""The libcst codemod on synthetic sources: every recognised form, and refusals of the rest."""

from __future__ import annotations

import pytest

from patcher import megatron_spec as spec

TEMPLATE = '''\
from megatron.core.extensions.transformer_engine import (
    TEDotProductAttention,
    {imports}
)


def get_spec(backend):
    # a comment that must survive
    return ModuleSpec(
        submodules=MLASelfAttentionSubmodules(
            linear_q_proj=backend.column_parallel_linear(),
            linear_q_down_proj={q},  # trailing comment
            linear_kv_down_proj={kv},
            core_attention=backend.core_attention(),
        ),
    )
'''


def source(q: str, kv: str, imports: str = "TELinear,") -> str:
    return TEMPLATE.format(q=q, kv=kv, imports=imports)


def test_builder_form_is_rewritten_and_nothing_else():
    before = source("backend.linear()", "backend.linear()")
    after = spec.rewrite(before)
    assert after == source("backend.column_parallel_linear()", "backend.column_parallel_linear()")
    assert spec.scan(after).supported and not spec.scan(after).needs_patch


def test_class_form_is_rewritten_and_import_added():
    after = spec.rewrite(source("TELinear", "TELinear"))
    assert "linear_q_down_proj=TEColumnParallelLinear,  # trailing comment" in after
    assert "linear_kv_down_proj=TEColumnParallelLinear," in after
    assert "    TELinear,\n    TEColumnParallelLinear,\n)" in after
    compile(after, "spec.py", "exec")


def test_class_form_import_not_duplicated():
    before = source("TELinear", "TELinear", imports="TELinear,\n    TEColumnParallelLinear,")
    after = spec.rewrite(before)
    assert after.count("TEColumnParallelLinear,\n") == 2  # the import and the kv argument
    assert after.count("import") == before.count("import")


def test_mixed_sites_only_duplicated_ones_change():
    before = source("backend.column_parallel_linear()", "backend.linear()")
    report = spec.scan(before)
    assert [s.state for s in report.sites] == [spec.COLUMN_PARALLEL, spec.NEEDS_PATCH]
    assert report.sites[1].line == 13
    assert report.sites[1].function == "get_spec"
    assert report.sites[1].replacement == "backend.column_parallel_linear()"
    assert spec.rewrite(before).count("column_parallel_linear()") == 3


def test_rewrite_is_idempotent():
    once = spec.rewrite(source("backend.linear()", "TELinear"))
    assert spec.rewrite(once) == once


@pytest.mark.parametrize(
    "q, kv",
    [
        ("backend.some_new_builder()", "backend.linear()"),
        ("make_linear(backend)", "backend.linear()"),
        ("MyLinear", "backend.linear()"),
    ],
)
def test_unknown_value_is_unrecognised(q, kv):
    report = spec.scan(source(q, kv))
    assert not report.supported
    assert report.sites[0].state == spec.UNRECOGNISED


def test_renamed_arguments_are_a_problem():
    report = spec.scan(source("backend.linear()", "backend.linear()").replace("linear_q_down_proj", "q_down"))
    assert not report.supported
    assert "has no linear_q_down_proj / linear_kv_down_proj" in report.problems[0]


def test_no_mla_call_at_all():
    report = spec.scan("def get_spec():\n    return SelfAttentionSubmodules(linear_qkv=X)\n")
    assert report.calls == 0 and not report.supported


def test_fused_down_projection_forms():
    fused_variable = '''\
def get_submodules(backend, fuse):
    down_proj_linear = backend.column_parallel_layer_norm_linear() if fuse else backend.linear()
    return MLASelfAttentionSubmodules(linear_qkv_down_proj=down_proj_linear)
'''
    report = spec.scan(fused_variable)
    assert report.supported and [s.state for s in report.sites] == [spec.FUSED]
    assert spec.rewrite(fused_variable) == fused_variable

    fused_duplicated = "MLASelfAttentionSubmodules(linear_qkv_down_proj=backend.linear())\n"
    assert spec.scan(fused_duplicated).needs_patch
    assert "linear_qkv_down_proj=backend.column_parallel_linear()" in spec.rewrite(fused_duplicated)

    unknown_variable = "def f(b):\n    x = b.other()\n    return MLASelfAttentionSubmodules(linear_qkv_down_proj=x)\n"
    assert not spec.scan(unknown_variable).supported


def test_syntax_error_names_the_line():
    with pytest.raises(spec.SpecParseError, match="line 2"):
        spec.scan("x = 1\ndef broken(:\n")
