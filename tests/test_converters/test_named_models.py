"""Every model the how-to names converts and loads first time: a scaled-down checkpoint of each published
config (same model_type, routing, query LoRA or not, rope, MTP, FP8 or BF16 release) -> `convert hf-mcore`
-> `convert check` on CPU, whose logits must match transformers' within its tolerance."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from convert_cli import convert, to_mcore

from converters.mcore.check import ATOL
from converters.testing import load_checkpoint, scaled_down_config, write_scaled_down_checkpoint
from toolkit.presets import preset_config

NAMED = ["deepseek-v3", "kimi-k2", "moonlight-16b-a3b", "deepseek-v2-lite"]
STRUCTURE = ["model_type", "architectures", "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group", "topk_method", "scoring_func",
             "norm_topk_prob", "routed_scaling_factor", "first_k_dense_replace", "moe_layer_freq", "rope_scaling", "rope_theta",
             "tie_word_embeddings", "num_nextn_predict_layers", "quantization_config"]


@pytest.mark.parametrize("name", NAMED)
def test_scaled_down_config_keeps_the_structure(name):
    release = preset_config(name)
    tiny = scaled_down_config(release)
    assert list(tiny) == list(release)
    assert {key: tiny.get(key) for key in STRUCTURE} == {key: release.get(key) for key in STRUCTURE}
    assert (tiny["q_lora_rank"] is None) == (release["q_lora_rank"] is None)
    assert tiny["n_routed_experts"] == min(release["n_routed_experts"], 64) and tiny["n_routed_experts"] % (tiny["n_group"] or 1) == 0
    assert tiny["num_hidden_layers"] == release["first_k_dense_replace"] + 2 and tiny["hidden_size"] < release["hidden_size"]


def test_scaled_down_experts_stay_a_multiple_of_the_groups():
    """No named model exercises it (64 is a multiple of 8 and 1): 256 experts in 3 groups scale to 63, not 64."""
    release = {**preset_config("deepseek-v3"), "n_group": 3, "topk_group": 1}
    assert scaled_down_config(release)["n_routed_experts"] == 63


# 15-25 s each on 2 cores (writing, converting and two model builds in subprocesses). Measured max |logit diff|:
# ~2e-7 for V3, Kimi-K2 and V2-Lite; ~9e-5 for Moonlight, whose rms_norm_eps is 1e-5: transformers builds MLA's
# q_a/kv_a layernorms with a fixed 1e-6, megatron-core with rms_norm_eps (the same model at eps 1e-6: 2e-7).
@pytest.mark.slow
@pytest.mark.parametrize("name", NAMED)
def test_named_model_converts_and_loads_with_hf_logits(name, tmp_path):
    started = time.perf_counter()
    src = tmp_path / "hf"
    config = write_scaled_down_checkpoint(src, preset_config(name))
    state = load_checkpoint(src)
    fp8 = "quantization_config" in config
    assert any(name.endswith("_scale_inv") for name in state) == fp8
    assert any(".self_attn.q_proj." in name for name in state) == (config["q_lora_rank"] is None)
    assert any(name.startswith(f"model.layers.{config['num_hidden_layers']}.eh_proj") for name in state) == bool(config.get("num_nextn_predict_layers"))
    hf = src
    if fp8:  # transformers (the checker's reference) reads the BF16 checkpoint the FP8 release stands for
        hf = tmp_path / "bf16"
        result = convert("fp8-bf16", "--src", str(src), "--dst", str(hf))
        assert result.returncode == 0, result.stderr
    release = to_mcore(src, tmp_path / "mcore")
    result = subprocess.run([sys.executable, "-m", "converters.cli", "check", "--hf", str(hf), "--mcore", str(release.parent),
                             "--backend", "cpu", "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and report["loaded"] and not report["missing"] and not report["unset"]
    assert report["tolerance"] == ATOL and report["max_abs_diff"] <= ATOL
    print(f"{name}: {report['asked_tensors']} tensors, max |logit diff| {report['max_abs_diff']:.2e}, cosine {report['cosine']}, "
          f"{time.perf_counter() - started:.1f} s")
