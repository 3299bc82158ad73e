"""The model description and the tables derived from it (converters/mcore/params.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from converters.mcore.mapping import plan_mapping
from converters.mcore.params import (
    GLOBAL_PARAMS,
    LAYER_PARAMS,
    MTP_PARAMS,
    SPEC_MARKERS,
    checkpoint_spec,
    hf_tensor_shapes,
    te_keys_map,
)
from converters.mcore.tp_layout import sharding_of
from converters.testing import TINY_DEEPSEEK_V3, deepseek_v3_config

TINY = {**TINY_DEEPSEEK_V3, "model_type": "deepseek_v3", "tie_word_embeddings": False, "topk_method": "noaux_tc"}
CAPTURES = sorted((Path(__file__).parents[1] / "data" / "te_keys").glob("*.json"))


def test_derived_spec_tables():
    assert te_keys_map(dense=False) == {
        "self_attention.q_layernorm.": "self_attention.linear_q_up_proj.layer_norm_",
        "self_attention.kv_layernorm.": "self_attention.linear_kv_up_proj.layer_norm_",
    }
    assert te_keys_map(dense=True) == {**te_keys_map(dense=False), "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
    # only the kv norm marks a spec: it is on every layer of every model (q_lora_rank null has no q norm)
    assert SPEC_MARKERS == {"te": ("self_attention.linear_kv_up_proj.layer_norm_weight",), "local": ("self_attention.kv_layernorm.weight",)}
    assert checkpoint_spec(["decoder.layers.3.pre_mlp_layernorm.weight"]) is None


def test_deepseek_v3_shapes_from_the_config():
    shapes = hf_tensor_shapes(deepseek_v3_config(), 1)
    assert shapes["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] == (576, 7168)
    assert shapes["model.layers.0.self_attn.q_b_proj.weight"] == (24576, 1536)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (7168, 18432)
    assert shapes["model.layers.3.mlp.experts.255.gate_proj.weight"] == (2048, 7168)
    assert shapes["model.layers.61.eh_proj.weight"] == (7168, 14336)
    assert "model.layers.3.mlp.gate_proj.weight" not in shapes and "model.layers.62.enorm.weight" not in shapes


@pytest.mark.parametrize("spec", ["te", "local"])
def test_every_planned_tensor_has_a_tp_rule_and_every_hf_tensor_is_used(spec):
    shapes = hf_tensor_shapes(TINY, 1)
    plan = plan_mapping(TINY, shapes, spec)
    assert plan.used_sources == set(shapes)
    for tensor in plan.tensors:
        sharding_of(tensor.key, len(tensor.shape))


@pytest.mark.parametrize("capture_path", CAPTURES, ids=lambda path: path.stem)
def test_the_description_names_every_tensor_a_real_te_model_asked_for(capture_path):
    """Every tensor key megatron-core + TE asked for (tests/data/te_keys) has a TP rule in the description,
    apart from the q norm megatron-core 0.19 fuses into linear_q_proj, which no HF model has."""
    capture = json.loads(capture_path.read_text())
    for model in capture["models"].values():
        for asked in model["layouts"].values():
            assert checkpoint_spec(asked) == "te"
            for key, shape in asked.items():
                if shape is not None and not key.endswith("linear_q_proj.layer_norm_weight"):
                    sharding_of(key, len(shape))


def test_the_config_decides_what_a_layer_has():
    """A deepseek_v2 router (greedy: no score bias) and a model without shared experts plan without those tensors
    and their extra state (the old tables required both whatever the config said)."""
    def planned(config: dict) -> list[str]:
        plan = plan_mapping(config, hf_tensor_shapes(config, 1))
        return [tensor.key for tensor in plan.tensors] + plan.objects

    greedy = planned({**TINY, "model_type": "deepseek_v2", "topk_method": "greedy"})
    assert not any("expert_bias" in key for key in greedy) and any("shared_experts" in key for key in greedy)
    unshared = planned({**TINY, "n_shared_experts": 0})
    assert not any("shared_experts" in key for key in unshared) and any("expert_bias" in key for key in unshared)


def test_entries_are_unique_per_spec():
    for params in (GLOBAL_PARAMS, LAYER_PARAMS, MTP_PARAMS):
        for spec in ("te", "local"):
            names = [(param.mcore(spec), param.layers) for param in params if param.mcore(spec)]
            assert len(names) == len(set(names)), spec
