"""Every preset `launch plan --model NAME` knows is the model's published config.json, and plans: the recipes
published for it are accepted, a recipe whose rollout weights overflow vLLM's share is refused, the auto plan
finds a layout on the node counts the how-to names."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from launch.plan import PlanError, check_rules, count_params, load_model_config, make_plan
from toolkit.presets import MODELS_DIR, PRESETS, preset_config
from toolkit.recipes import RECIPES


def plan_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", "plan", *args], capture_output=True, text=True)


# (total parameters without MTP, activated per token) as the model cards state them, and our tolerance
PUBLISHED_SIZE = {
    "deepseek-v3": (671e9, 37e9),
    "deepseek-v3-0324": (671e9, 37e9),
    "deepseek-r1": (671e9, 37e9),
    "kimi-k2": (1.04e12, 32e9),
    "moonlight-16b-a3b": (16e9, 3e9),
    "deepseek-v2-lite": (15.7e9, 2.4e9),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_is_a_published_config_of_its_size_class(name):
    config = preset_config(name)
    assert load_model_config(name) == config  # `launch plan --model NAME` resolves the preset
    counts = count_params(config)
    total = counts.dense + counts.experts
    activated = counts.dense + counts.experts * config["num_experts_per_tok"] // config["n_routed_experts"]
    published_total, published_activated = PUBLISHED_SIZE[name]
    assert abs(total - published_total) / published_total < 0.03, total
    assert abs(activated - published_activated) / published_activated < 0.2, activated
    assert check_rules(make_plan(name, 64, 8, 141)[0], config) == []  # every preset plans on a big cluster


def test_presets_carry_the_facts_sources_md_states():
    v3, r1, kimi = preset_config("deepseek-v3"), preset_config("deepseek-r1"), preset_config("kimi-k2")
    moonlight, lite = preset_config("moonlight-16b-a3b"), preset_config("deepseek-v2-lite")
    # V3: FP8 release with one MTP layer; R1 equal but for transformers_version
    assert v3["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    assert v3["num_nextn_predict_layers"] == 1 and v3["num_hidden_layers"] == 61
    drop = lambda c: {k: v for k, v in c.items() if k != "transformers_version"}  # noqa: E731
    assert drop(r1) == drop(v3) and r1["transformers_version"] != v3["transformers_version"]
    # Kimi-K2-Instruct (0711): its own model_type, 384 experts, no groups, rope factor 32 (0905's is 64), beta_fast on line 51
    assert (kimi["model_type"], kimi["architectures"], kimi["n_routed_experts"], kimi["n_group"]) == ("kimi_k2", ["DeepseekV3ForCausalLM"], 384, 1)
    assert kimi["rope_scaling"]["factor"] == 32.0
    assert (MODELS_DIR / PRESETS["kimi-k2"]).read_text().splitlines()[50].strip() == '"beta_fast": 1.0,'
    # Moonlight: no query LoRA, no groups, plain rope (theta 50000), a BF16 release
    assert moonlight["q_lora_rank"] is None and moonlight["n_group"] == 1 and moonlight["rope_theta"] == 50000.0
    assert "rope_scaling" not in moonlight and "quantization_config" not in moonlight
    # DeepSeek-V2-Lite: deepseek_v2, softmax scores with greedy top-k, weights not renormalised
    assert (lite["model_type"], lite["q_lora_rank"], lite["scoring_func"], lite["topk_method"], lite["norm_topk_prob"]) == (
        "deepseek_v2", None, "softmax", "greedy", False)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_each_recipe_suits_the_model_it_was_published_for(recipe):
    """make_plan refuses a recipe that breaks a rule or whose vLLM weights do not fit the engine's share."""
    plan = RECIPES[recipe]
    accepted, _ = make_plan(RECIPES[recipe].model, plan.nodes, plan.gpus_per_node, plan.gpu_mem_gb, recipe)
    assert accepted == plan


def test_moonlight_plans_on_one_two_and_three_nodes():
    one = plan_cli("--model", "moonlight-16b-a3b", "--nodes", "1", "--recipe", "pai-moonlight-1x8", "--json")
    assert one.returncode == 0, one.stderr
    report = json.loads(one.stdout)
    assert (report["tp"], report["pp"], report["ep"], report["etp"], report["rollout_tp"], report["vllm_engines"]) == (4, 1, 2, 2, 8, 1)
    assert report["memory_gb"]["fits"] and report["moe_layers"] == 26
    two = plan_cli("--model", "moonlight-16b-a3b", "--nodes", "2", "--json")
    assert two.returncode == 0, two.stderr
    auto = json.loads(two.stdout)
    assert auto["recipe"] is None and auto["world"] == 16 and auto["memory_gb"]["fits"]
    assert 64 % auto["ep"] == 0 and 16 % auto["tp"] == 0 and auto["dp"] * auto["tp"] * auto["pp"] == 16
    three = plan_cli("--model", "moonlight-16b-a3b", "--nodes", "3", "--recipe", "verl-moonlight-3x8", "--json")
    assert three.returncode == 0, three.stderr
    report = json.loads(three.stdout)
    assert (report["tp"], report["pp"], report["ep"], report["rollout_tp"], report["micro_batch_size"]) == (4, 3, 4, 4, 16)
    assert not (report["param_offload"] or report["grad_offload"] or report["optimizer_offload"]) and report["memory_gb"]["fits"]


@pytest.mark.parametrize("nodes", [32, 64])
def test_kimi_k2_auto_plans(nodes):
    result = plan_cli("--model", "kimi-k2", "--nodes", str(nodes), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["world"] == 8 * nodes and report["memory_gb"]["fits"] and report["moe_layers"] == 60
    assert 384 % report["ep"] == 0 and 64 % report["tp"] == 0
    assert report["memory_gb"]["rollout_weights_per_gpu"] <= 0.85 * report["memory_gb"]["vllm_share"]


def test_kimi_k2_refuses_a_deepseek_recipe_whose_rollout_weights_overflow_vllm():
    with pytest.raises(PlanError, match=r"vLLM's BF16 weights are .* GB per GPU at rollout TP 32, more than 85% of its .* share"):
        make_plan("kimi-k2", 64, 8, 96, "verl-h20-64")
    result = plan_cli("--model", "kimi-k2", "--nodes", "64", "--recipe", "verl-h20-64", "--gpu-mem-gb", "96")
    assert result.returncode == 2 and "recipe verl-h20-64 does not suit this model" in result.stderr
    make_plan("deepseek-v3", 64, 8, 96, "verl-h20-64")  # the same recipe suits the model it was written for
