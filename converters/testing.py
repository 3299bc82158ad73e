"""Test and demo inputs, generated (nothing downloaded): the full-size DeepSeek-V3 config, tiny FP8 checkpoints, MATH rows.

No converter imports this module; tests, benches and `launch demo` do.
"""

from __future__ import annotations

from typing import Any

from toolkit.presets import preset_config


def deepseek_v3_config() -> dict[str, Any]:
    """DeepSeek-V3's published config.json (671B, FP8; V3-0324 and R1 share every value but transformers_version),
    the preset's file (toolkit/models/deepseek-v3.json, sources in SOURCES.md): a fresh copy each call."""
    return preset_config("deepseek-v3")


TINY_DEEPSEEK_V3 = {
    "vocab_size": 320,
    "hidden_size": 200,
    "intermediate_size": 264,
    "moe_intermediate_size": 136,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "q_lora_rank": 136,
    "kv_lora_rank": 144,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "routed_scaling_factor": 2.5,
    "max_position_embeddings": 256,
    "num_nextn_predict_layers": 1,
}

# Tensors DeepSeek keeps in BF16 (or float32) inside an FP8 checkpoint.
_NOT_FP8 = ("norm", "mlp.gate.weight", "e_score_correction_bias", "embed_tokens", "lm_head", "eh_proj", "shared_head")
EXTRA_FILES = {
    "tokenizer_config.json": '{"model_max_length": 256}\n',
    "generation_config.json": '{"bos_token_id": 0, "eos_token_id": 1}\n',
    "modeling_deepseek.py": "# remote code shipped with the checkpoint\n",
    "LICENSE": "generated test fixture\n",
}


def is_fp8_weight(name: str, tensor) -> bool:
    """Whether DeepSeek's FP8 release stores this tensor as e4m3 with a 128x128 scale_inv."""
    return tensor.dim() == 2 and name.endswith(".weight") and not any(part in name for part in _NOT_FP8)


def tiny_bf16_state_dict(overrides: dict[str, Any] | None = None, seed: int = 0):
    """(config dict, HF-format state dict in bf16 with a float32 expert bias, MTP layer included)."""
    settings = {**TINY_DEEPSEEK_V3, **(overrides or {})}
    mtp_layers = settings.pop("num_nextn_predict_layers")
    config, state = _hf_state_dict("deepseek_v3", settings, mtp_layers, seed)
    # as in the released config.json (transformers 5 no longer writes the router's keys)
    config.update(scoring_func="sigmoid", topk_method="noaux_tc")
    return config, state


def _hf_state_dict(model_type: str, settings: dict[str, Any], mtp_layers: int, seed: int):
    """(transformers' config dict, bf16 state dict) of a randomly initialised model built by transformers'
    own class for `model_type` (deepseek_v2: DeepseekV2ForCausalLM; deepseek_v3 and kimi_k2, which is
    DeepSeek-V3's architecture: DeepseekV3ForCausalLM), plus `mtp_layers` MTP modules in DeepSeek's layout."""
    import tempfile

    import torch
    from safetensors.torch import load_file
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    config_class, model_class = (DeepseekV2Config, DeepseekV2ForCausalLM) if model_type == "deepseek_v2" else (DeepseekV3Config, DeepseekV3ForCausalLM)
    layers = settings["num_hidden_layers"]
    torch.manual_seed(seed)
    # Build one extra decoder layer per MTP module: its weights become the MTP transformer layer.
    model = model_class(config_class(**{**settings, "num_hidden_layers": layers + mtp_layers}))
    with tempfile.TemporaryDirectory() as scratch:
        model.to(torch.bfloat16).save_pretrained(scratch)
        state = load_file(f"{scratch}/model.safetensors")
    hidden = settings["hidden_size"]
    generator = torch.Generator().manual_seed(seed + 1)
    for name in list(state):
        if name.endswith("e_score_correction_bias"):
            state[name] = torch.rand(state[name].shape, generator=generator, dtype=torch.float32) * 0.1
        elif name.endswith("norm.weight"):
            state[name] = (1 + 0.1 * torch.randn(state[name].shape, generator=generator)).to(torch.bfloat16)
    for k in range(mtp_layers):
        prefix = f"model.layers.{layers + k}."
        state[prefix + "enorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        state[prefix + "hnorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        state[prefix + "eh_proj.weight"] = (0.02 * torch.randn(hidden, 2 * hidden, generator=generator)).to(torch.bfloat16)
        state[prefix + "embed_tokens.weight"] = state["model.embed_tokens.weight"].clone()
        state[prefix + "shared_head.norm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        state[prefix + "shared_head.head.weight"] = state["lm_head.weight"].clone()
    config = model.config.to_dict()
    config.update(num_hidden_layers=layers, num_nextn_predict_layers=mtp_layers)
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = "bfloat16"
    return config, state


# The widths of a scaled-down model: small, the MLA head dims in DeepSeek's proportions (nope 2 x rope = v).
SCALED_WIDTHS = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "kv_lora_rank": 32,
    "q_lora_rank": 48,
}
MAX_SCALED_EXPERTS = 64


def scaled_down_config(release: dict[str, Any], moe_layers: int = 2) -> dict[str, Any]:
    """A tiny config of the same structure as a published config.json (e.g. `toolkit.presets.preset_config`).

    Kept as published: every key and its order, model_type, architectures, whether q_lora_rank is null,
    n_shared_experts, num_experts_per_tok, n_group / topk_group, topk_method, scoring_func, norm_topk_prob,
    routed_scaling_factor, first_k_dense_replace, moe_layer_freq, rope_scaling (presence, type and values),
    rope_theta, tie_word_embeddings, num_nextn_predict_layers, quantization_config. n_routed_experts is kept
    when it is at most 64; otherwise it becomes 64 rounded down to a multiple of n_group (DeepSeek-V3: 256 ->
    64, 8 per group; Kimi-K2: 384 -> 64), so every group keeps as many experts as it had or fewer but
    the groups, top-k and top-k groups stay. The widths are SCALED_WIDTHS (q_lora_rank only where the
    release has one); the layers are the dense ones plus `moe_layers` MoE layers (first_k_dense_replace
    + 2 with moe_layer_freq 1); bos/eos ids fit the small vocabulary."""
    config = dict(release)
    for key, value in SCALED_WIDTHS.items():
        if key in config and not (key == "q_lora_rank" and config[key] is None):
            config[key] = value
    experts = config.get("n_routed_experts") or 0
    groups = config.get("n_group") or 1
    if experts > MAX_SCALED_EXPERTS:
        config["n_routed_experts"] = MAX_SCALED_EXPERTS - MAX_SCALED_EXPERTS % groups
    from converters.mcore.config import moe_layer_freq

    layers = config.get("first_k_dense_replace", 0)
    while sum(moe_layer_freq({**config, "num_hidden_layers": layers})) < moe_layers:
        layers += 1
    config["num_hidden_layers"] = layers
    for key in ("bos_token_id", "eos_token_id"):
        if isinstance(config.get(key), int) and config[key] >= config["vocab_size"]:
            config[key] = config[key] % config["vocab_size"]
    return config


def write_scaled_down_checkpoint(dst, release: dict[str, Any], seed: int = 0, shards: int = 2) -> dict[str, Any]:
    """A random checkpoint of `scaled_down_config(release)` in the release's format: FP8 blocks with
    `_scale_inv` when the release has a quantization_config, BF16 otherwise; MTP layers in DeepSeek's layout
    when it has num_nextn_predict_layers. The weights come from transformers' class for the model_type
    (`_hf_state_dict`); config.json is the release's keys with the small sizes. Returns the config."""
    config = scaled_down_config(release)
    settings = {key: value for key, value in config.items() if key not in ("architectures", "auto_map", "model_type", "quantization_config",
                                                                               "transformers_version", "torch_dtype", "dtype")}
    mtp_layers = settings.pop("num_nextn_predict_layers", 0) or 0
    _, state = _hf_state_dict(config["model_type"], settings, mtp_layers, seed)
    quantised = "quantization_config" in config
    write_checkpoint(dst, config, quantise_state_dict(state) if quantised else state, shards)
    return config


def write_checkpoint(
    dst, config: dict[str, Any], tensors: dict, shards: int = 3, move_scale: str | None = None, extra_files: dict[str, str] = EXTRA_FILES
) -> None:
    """Write a HF checkpoint: `shards` safetensors files of similar size, index, config, `extra_files` (name -> text).

    `move_scale` names a tensor whose `_scale_inv` goes to a different shard than the weight.
    """
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    groups: list[list[str]] = [[]]
    size = 0
    for name in names:
        if size > total * len(groups) / shards and len(groups) < shards:
            groups.append([])
        groups[-1].append(name)
        size += tensors[name].numel() * tensors[name].element_size()
    if move_scale is not None:
        scale = move_scale + "_scale_inv"
        home = next(i for i, group in enumerate(groups) if scale in group)
        groups[home].remove(scale)
        groups[(home + 1) % len(groups)].append(scale)
    weight_map = {}
    for i, group in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({name: tensors[name].contiguous() for name in group}, str(dst / shard), metadata={"format": "pt"})
        weight_map.update({name: shard for name in group})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name, text in extra_files.items():
        (dst / name).write_text(text)


def quantise_state_dict(state: dict) -> dict:
    """The FP8 release layout of a BF16 state dict: e4m3 weights plus float32 `_scale_inv`, by our kernel."""
    from kernels.fp8 import quant_fp8_blocks

    out = {}
    for name, tensor in state.items():
        if is_fp8_weight(name, tensor):
            out[name], out[name + "_scale_inv"] = quant_fp8_blocks(tensor)
        else:
            out[name] = tensor
    return out


def make_fp8_checkpoint(dst, overrides: dict[str, Any] | None = None, seed: int = 0, shards: int = 3) -> dict[str, Any]:
    """A tiny DeepSeek-V3 FP8 checkpoint in the real release layout; returns its config dict."""
    config, state = tiny_bf16_state_dict(overrides, seed)
    config["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
    write_checkpoint(dst, config, quantise_state_dict(state), shards, move_scale="model.layers.0.self_attn.kv_a_proj_with_mqa.weight")
    return config


def load_checkpoint(path) -> dict:
    """Every tensor of every safetensors shard in a HF dir (tests and the demo; small models only)."""
    from pathlib import Path

    from safetensors.torch import load_file

    state = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(str(shard)))
    return state


def dequantised(fp8_state: dict) -> dict:
    """The BF16 state dict an FP8 checkpoint stands for: each e4m3 weight times its scale_inv."""
    import torch

    from kernels.fp8 import dequant_fp8_blocks

    return {
        name: dequant_fp8_blocks(t, fp8_state[name + "_scale_inv"]) if t.dtype == torch.float8_e4m3fn else t
        for name, t in fp8_state.items()
        if not name.endswith("_scale_inv")
    }


def math_sample_rows() -> dict[str, list[dict[str, str]]]:
    """A small MATH-format sample we wrote ourselves: nested braces, \\boxed with a space, \\fbox, no box."""
    train = [
        {"problem": "What is $1+1$?", "level": "Level 1", "type": "Prealgebra", "solution": "$1+1=\\boxed{2}$."},
        {"problem": "Simplify $\\frac{6}{8}$.", "level": "Level 2", "type": "Prealgebra", "solution": "Divide by 2: $\\boxed{\\frac{3}{4}}$."},
        {"problem": "Solve $x^2=9$, $x>0$.", "level": "Level 1", "type": "Algebra", "solution": "First $x=\\pm 3$; so $\\boxed{3}$... final: $\\boxed{3}$"},
        {"problem": "Evaluate $\\sqrt{16}$.", "level": "Level 1", "type": "Algebra", "solution": "It is $\\boxed 4$."},
        {"problem": "Interval for $x^2<4$?", "level": "Level 3", "type": "Algebra", "solution": "$\\boxed{(-2,2)}$"},
        {"problem": "Name the set $\\{1,2\\}$'s size.", "level": "Level 1", "type": "Counting & Probability", "solution": "Size $\\boxed{2}$ of $\\{1,2\\}$."},
        {"problem": "Area of a unit square?", "level": "Level 1", "type": "Geometry", "solution": "The area is $\\fbox{1}$."},
        {"problem": "Proof-only question.", "level": "Level 5", "type": "Number Theory", "solution": "We show it holds for all n. QED"},
        {"problem": "Unbalanced.", "level": "Level 5", "type": "Algebra", "solution": "Answer: \\boxed{\\frac{1}{2}"},
    ]
    test = [
        {"problem": "What is $2\\cdot 3$?", "level": "Level 1", "type": "Prealgebra", "solution": "$2\\cdot 3 = \\boxed{6}$"},
        {"problem": "Write $0.5$ as a fraction.", "level": "Level 1", "type": "Prealgebra", "solution": "$\\boxed{\\dfrac{1}{2}}$"},
    ]
    return {"train": train, "test": test}


# ---------------------------------------------------------------------------------------------
# A tiny DeepSeek-V3 that real engines serve (vLLM, Megatron-Bridge, transformers), for GRPO runs.
# MLA keeps the release's attention sizes (kv_lora_rank + qk_rope_head_dim = 576 selects vLLM's
# Hopper MLA backends; 128/64/128 head dims), everything else is small. vocab_size is a multiple of
# 1280 like the release's 129280 (Megatron-Bridge's divisor for this family: no padding question).
SERVABLE_DEEPSEEK_V3 = {
    "vocab_size": 1280,
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "q_lora_rank": 192,
    "kv_lora_rank": 512,
    # routing in DeepSeek-V3's proportions: 4 experts per group, top-k / topk_group = 2 (the release: 8 / 4),
    # the two top scores per group that HF, vLLM and megatron-core all sum to rank groups
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "routed_scaling_factor": 2.5,
    "max_position_embeddings": 4096,
    "num_nextn_predict_layers": 1,
}
# DeepSeek's own special tokens (fullwidth bar U+FF5C, block U+2581): verl's DeepSeek prompt builder looks them up.
SPECIAL_TOKENS = ["<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>", "<\uff5c\u2581pad\u2581\uff5c>",
                  "<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>"]
# DeepSeek-V3's chat template in shape (BOS, role markers, EOS after each assistant turn), shorter.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}<\uff5cUser\uff5c>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<\uff5cAssistant\uff5c>{{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<\uff5cAssistant\uff5c>{% endif %}"
)
_WORDS = ("the", "a", "of", "number", "answer", "digit", "write", "reply", "with", "only", "what", "is", "sum",
          "find", "value", "let", "think", "step", "by", "and", "final", "output", "within", "boxed", "solve",
          "simplify", "area", "square", "fraction", "evaluate", "interval", "for", "set", "size", "first", "so")


def tokenizer_corpus(lines: int = 6000, seed: int = 0) -> list[str]:
    """Generated training text for the tiny tokenizer: English-like and made-up words, a few short
    numbers, LaTeX, the MATH sample. Numbers are rare, so few tokens are digits only (the GRPO smoke
    task rewards digits and should start low)."""
    import random

    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"]
    made_up = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(400)]
    corpus = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) if rng.random() < 0.5 else rng.choice(made_up) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.3:
            words.insert(rng.randint(0, len(words)), str(rng.randint(0, 999)))
        if rng.random() < 0.2:
            words.append(rng.choice(["$\\frac{a}{b}$", "\\boxed{x}", "$x^2$", "$\\sqrt{y}$", "$y+z$", "\\dfrac{1}{2}"]))
        corpus.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ","]))
    for rows in math_sample_rows().values():
        corpus += [row["problem"] + " " + row["solution"] for row in rows]
    return corpus


def write_tokenizer(dst, vocab_size: int = 1280, seed: int = 0) -> int:
    """Train a byte-level BPE tokenizer on generated text (any input encodes, nothing unknown) and write
    tokenizer.json + tokenizer_config.json (chat template, BOS/EOS/pad) into `dst`; returns its size."""
    import json
    from pathlib import Path

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(tokenizer_corpus(seed=seed), trainer=trainer)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(dst / "tokenizer.json"))
    bos, eos, pad = SPECIAL_TOKENS[:3]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "pad_token": pad,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 4096, "chat_template": CHAT_TEMPLATE,
    }
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tokenizer.get_vocab_size()


def make_servable_fp8_checkpoint(dst, seed: int = 0, shards: int = 2, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A tiny DeepSeek-V3 in the FP8 release layout that vLLM serves and Megatron-Bridge builds: random
    weights, a trained tokenizer with a chat template, generation_config.json, the release's config keys
    (yarn rope_scaling, noaux_tc sigmoid router, groups, MTP layer, quantization_config)."""
    import json
    from pathlib import Path

    settings = {**SERVABLE_DEEPSEEK_V3, **(overrides or {})}
    config, state = tiny_bf16_state_dict(settings, seed)
    release = deepseek_v3_config()
    # the release's key set and order, with our sizes; special token ids from the tokenizer below
    config = {key: config.get(key, value) for key, value in release.items()}
    config.update({key: value for key, value in settings.items() if key in release})
    config.update(bos_token_id=0, eos_token_id=1)  # the tokenizer's BOS and EOS (SPECIAL_TOKENS' order)
    config["rope_scaling"] = {**release["rope_scaling"], "original_max_position_embeddings": settings["max_position_embeddings"]}
    config["max_position_embeddings"] = settings["max_position_embeddings"] * release["rope_scaling"]["factor"]
    config.pop("auto_map")  # no remote code: transformers, vLLM and Megatron-Bridge know deepseek_v3
    generation = {"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 1.0, "top_p": 1.0}
    write_checkpoint(dst, config, quantise_state_dict(state), shards,
                     extra_files={"generation_config.json": json.dumps(generation, indent=2) + "\n", "LICENSE": EXTRA_FILES["LICENSE"]})
    size = write_tokenizer(Path(dst), settings["vocab_size"], seed)
    if size > settings["vocab_size"]:
        raise ValueError(f"tokenizer has {size} entries, more than vocab_size {settings['vocab_size']}")
    return config


def digit_task_rows(count: int, seed: int = 0) -> list[dict[str, str]]:
    """Prompts of the GRPO smoke task (reward: share of digits in the response, `launch/rewards.py`),
    as `convert prompts` reads them: a short request with a few generated words, no ground truth."""
    import random

    rng = random.Random(seed)
    asks = ("Reply with a number", "Write digits only", "Give the answer as digits", "Output a long number")
    return [{"prompt": f"{rng.choice(asks)}: {' '.join(rng.choice(_WORDS) for _ in range(rng.randint(2, 6)))}", "ground_truth": ""}
            for _ in range(count)]
