"""HF DeepSeek-V3-class config.json -> megatron-core MLATransformerConfig arguments, as one table.

Used by the checkpoint converter (shapes and layer layout), by the loading tests (to build a real
GPTModel) and by `launch` (to check a plan against the model).
"""

from __future__ import annotations

from typing import Any

import torch

from toolkit.errors import ConvertError

# megatron-core field <- HF config key, read top to bottom
CONFIG_MAPPING: dict[str, str] = {
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "intermediate_size",
    "num_attention_heads": "num_attention_heads",
    "layernorm_epsilon": "rms_norm_eps",
    "q_lora_rank": "q_lora_rank",
    "kv_lora_rank": "kv_lora_rank",
    "qk_head_dim": "qk_nope_head_dim",
    "qk_pos_emb_head_dim": "qk_rope_head_dim",
    "v_head_dim": "v_head_dim",
    "num_moe_experts": "n_routed_experts",
    "moe_router_topk": "num_experts_per_tok",
    "moe_ffn_hidden_size": "moe_intermediate_size",
    "moe_router_num_groups": "n_group",
    "moe_router_group_topk": "topk_group",
    "moe_router_topk_scaling_factor": "routed_scaling_factor",
}

# the same for every DeepSeek-V3-class model
FIXED: dict[str, Any] = {
    "normalization": "RMSNorm",
    "gated_linear_unit": True,
    "add_bias_linear": False,
    "add_qkv_bias": False,
    "qk_layernorm": True,
    "multi_latent_attention": True,
    "moe_router_dtype": "fp32",
    "moe_router_load_balancing_type": "none",
    "moe_aux_loss_coeff": 0.0,
    "moe_router_bias_update_rate": 0.0,  # keep the checkpoint's expert bias
    "moe_token_dispatcher_type": "alltoall",
    "moe_grouped_gemm": False,
    "persist_layer_norm": False,
    "bias_activation_fusion": False,
    "bias_dropout_fusion": False,
    "apply_rope_fusion": False,
    "masked_softmax_fusion": False,
    "gradient_accumulation_fusion": False,
}


class ConfigError(ConvertError, ValueError):
    """config.json lacks what a DeepSeek-V3-class conversion needs; the message names the key."""


SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "kimi_k2")

# Router facts a config.json may leave out (transformers 5 drops them for deepseek_v3): the family's own.
ROUTER_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v3": {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True},
    "kimi_k2": {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True},
    "deepseek_v2": {"scoring_func": "softmax", "topk_method": "greedy", "norm_topk_prob": False},
}


def _rope(config: dict[str, Any]) -> dict[str, Any]:
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    base = config.get("rope_theta", scaling.get("rope_theta", 10000))
    if kind in (None, "default"):
        return {"rope_type": "rope", "rotary_base": base}
    if kind != "yarn":
        raise ConfigError(f"rope type {kind!r} is not supported (DeepSeek-V3 uses yarn)")
    return {
        "rope_type": "yarn",
        "rotary_base": base,
        "rotary_scaling_factor": scaling["factor"],
        "original_max_position_embeddings": scaling["original_max_position_embeddings"],
        "beta_fast": scaling.get("beta_fast", 32),
        "beta_slow": scaling.get("beta_slow", 1),
        "mscale": scaling.get("mscale", 1.0),
        # megatron-core's default mscale_all_dim is 0; DeepSeek's is 1, and it sets the softmax scale
        "mscale_all_dim": scaling.get("mscale_all_dim", 0.0),
    }


def moe_layer_freq(config: dict[str, Any]) -> list[int]:
    """1 for a MoE layer, 0 for a dense one, per decoder layer."""
    layers = config["num_hidden_layers"]
    dense = config.get("first_k_dense_replace", 0)
    every = config.get("moe_layer_freq", 1) or 1
    return [int(i >= dense and i % every == 0) for i in range(layers)]


def mcore_config_kwargs(config: dict[str, Any], mtp: bool = True) -> dict[str, Any]:
    """Keyword arguments for MLATransformerConfig from a HF config dict (no parallel sizes)."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"model_type {model_type!r} is not a DeepSeek-V3-class model ({', '.join(SUPPORTED_MODEL_TYPES)})")
    missing = [key for key in CONFIG_MAPPING.values() if key not in config and key not in ("q_lora_rank", "n_group", "topk_group")]
    if missing:
        raise ConfigError(f"config.json lacks {', '.join(missing)}")
    config = {**ROUTER_DEFAULTS[model_type], **config}
    kwargs: dict[str, Any] = {mcore: config.get(hf) for mcore, hf in CONFIG_MAPPING.items()}
    kwargs.update(FIXED)
    kwargs["activation_func"] = torch.nn.functional.silu  # SwiGLU: silu(gate) * up
    kwargs.update(_rope(config))
    scoring = config["scoring_func"]
    kwargs.update(
        moe_layer_freq=moe_layer_freq(config),
        moe_shared_expert_intermediate_size=config.get("n_shared_experts", 0) * config["moe_intermediate_size"] or None,
        moe_router_score_function=scoring,
        moe_router_enable_expert_bias=config.get("topk_method") == "noaux_tc",
        # softmax over all experts then top-k without renormalising (V2-Lite); sigmoid renormalises
        moe_router_pre_softmax=scoring == "softmax" and not config.get("norm_topk_prob", False),
        moe_router_num_groups=config.get("n_group") if (config.get("n_group") or 1) > 1 else None,
        moe_router_group_topk=config.get("topk_group") if (config.get("n_group") or 1) > 1 else None,
        moe_router_topk_scaling_factor=config.get("routed_scaling_factor") or None,
        mtp_num_layers=(config.get("num_nextn_predict_layers") or None) if mtp else None,
        kv_channels=config["v_head_dim"],
    )
    return kwargs


def gpt_model_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """GPTModel arguments that come from the HF config (vocabulary, positions, tied embeddings)."""
    return {
        "vocab_size": config["vocab_size"],
        "max_sequence_length": config.get("max_position_embeddings", 4096),
        "share_embeddings_and_output_weights": bool(config.get("tie_word_embeddings", False)),
        "position_embedding_type": "none",  # MLA applies its own rotary embedding
    }
