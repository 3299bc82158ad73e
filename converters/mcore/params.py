"""The one description of a DeepSeek-V3-class model's parameters: one entry per parameter kind, every fact on it.

An entry says where the parameter sits in HF (name pattern), in Megatron-Core (name per spec), how tensor
parallelism splits it, whether its module carries an `_extra_state` object, and its shape from config.json.
Everything else is derived from these tuples: the HF names and shapes (`hf_tensor_shapes`), the TP rules
(`sharding_table`, read by converters/mcore/tp_layout.py), the local->TE key map (`te_keys_map`), how a
checkpoint's spec is recognised (`SPEC_MARKERS`, `checkpoint_spec`), and the conversion plan itself
(converters/mcore/mapping.py). A new parameter or model family is an entry here.

Name patterns are relative to their scope's prefix: none for GLOBAL_PARAMS, `model.layers.{i}.` and
`decoder.layers.{i}.` for LAYER_PARAMS, `model.layers.{num_hidden_layers + k}.` and `mtp.layers.{k}.` for
MTP_PARAMS (the MTP module's decoder layer itself uses LAYER_PARAMS under `mtp.layers.{k}.transformer_layer.`).
Two HF names make one mcore tensor by concatenation along dim 0 (SwiGLU `linear_fc1` = cat(gate, up)); `{e}`
in a HF name stacks the routed experts along a leading expert axis. Those are the only transforms.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from converters.mcore.config import moe_layer_freq

SPECS = ("te", "local")
COLUMN, ROW, REPLICATED = "column", "row", "replicated"
# which decoder layers have the parameter
EVERY, DENSE, MOE = "every", "dense", "moe"


def has_q_lora(config: dict[str, Any]) -> bool:
    """q_lora_rank set: a down/up pair; null (DeepSeek-V2-Lite): one q_proj."""
    return bool(config.get("q_lora_rank"))


def has_q_proj(config: dict[str, Any]) -> bool:
    return not has_q_lora(config)


def untied(config: dict[str, Any]) -> bool:
    return not config.get("tie_word_embeddings")


def has_expert_bias(config: dict[str, Any]) -> bool:
    """noaux_tc routing keeps a per-expert score bias; a config.json may leave topk_method out (its family's default)."""
    default = "greedy" if config.get("model_type") == "deepseek_v2" else "noaux_tc"
    return config.get("topk_method", default) == "noaux_tc"


def has_shared_experts(config: dict[str, Any]) -> bool:
    return bool(config.get("n_shared_experts"))


def dims(config: dict[str, Any]) -> dict[str, int | None]:
    """The sizes shapes are written in: config.json's own keys, and the products MLA and MoE make of them."""
    heads, rope = config["num_attention_heads"], config["qk_rope_head_dim"]
    nope, v = config["qk_nope_head_dim"], config["v_head_dim"]
    sizes = {key: config.get(key) for key in ("hidden_size", "vocab_size", "q_lora_rank", "kv_lora_rank", "intermediate_size",
                                              "moe_intermediate_size")}
    sizes.update({
        "n_routed_experts": config.get("n_routed_experts") or 0,
        "2*hidden_size": 2 * config["hidden_size"],  # the MTP eh_proj reads cat(embedding, hidden state)
        "q_heads": heads * (nope + rope),
        "kv_lora_rank+rope": config["kv_lora_rank"] + rope,  # 576 in DeepSeek-V3: 4.5 FP8 blocks
        "kv_heads": heads * (nope + v),
        "o_in": heads * v,
        "shared": (config.get("n_shared_experts") or 0) * (config.get("moe_intermediate_size") or 0),
    })
    return sizes


@dataclass(frozen=True)
class ExtraState:
    """The parameter's module carries an `_extra_state` ShardedObject a loader asks for (None unless FP8 training).

    `position` orders a layer's objects as the writer always has (it decides the bytes of every checkpoint, and a
    resumed conversion mixes files of two runs). `te_only`: a TE module whose local-spec twin is a plain torch
    module. `module`: for a module without parameters (else the parameter's own module)."""

    position: int
    te_only: bool = False
    module: str | None = None


@dataclass(frozen=True)
class Param:
    hf: tuple[str, ...]  # HF name(s); several: concatenated along dim 0; "{e}": one per routed expert, stacked
    te: str | None  # mcore name in the TE spec; None: not written (the MTP layer's copies of shared tensors)
    local: str | None = None  # mcore name in the local spec, where it differs (TE fuses some norms into linears)
    shape: tuple[str, ...] = ()  # shape of each HF tensor, in dims() names
    tp: str = REPLICATED  # how TP (ETP for routed experts) splits the mcore tensor: COLUMN dim 0, ROW last dim
    layers: str = EVERY  # LAYER_PARAMS: on every decoder layer, or on dense / MoE ones only
    when: Callable[[dict[str, Any]], bool] | None = None  # a model of this config has it (None: always)
    required: bool = True  # absent although `when` holds: the checkpoint is refused (else mapped only when present)
    extra_state: ExtraState | None = None
    float32: bool = False  # stored as float32 (everything else is bf16)
    copy_of: tuple[str, ...] = ()  # not written: the HF tensor is a copy of the first of these the model has
    fp8: bool = False  # DeepSeek's FP8 release stores it as e4m3 with a float32 scale_inv per 128x128 block

    def mcore(self, spec: str) -> str | None:
        return self.local if spec == "local" and self.local else self.te

    @property
    def stacked(self) -> bool:
        return any("{e}" in name for name in self.hf)

    def applies(self, config: dict[str, Any]) -> bool:
        return self.when is None or self.when(config)


def te_norm(position: int) -> ExtraState:
    """TENorm (te.pytorch.RMSNorm) is a TE op with extra state; the local spec's norms are plain torch modules."""
    return ExtraState(position, te_only=True)


GLOBAL_PARAMS: tuple[Param, ...] = (
    Param(("model.embed_tokens.weight",), "embedding.word_embeddings.weight", shape=("vocab_size", "hidden_size"), tp=COLUMN),  # vocab-parallel
    Param(("model.norm.weight",), "decoder.final_layernorm.weight", shape=("hidden_size",), extra_state=te_norm(0)),
    Param(("lm_head.weight",), "output_layer.weight", shape=("vocab_size", "hidden_size"), tp=COLUMN, when=untied),
)

# In HF's order; the writer emits a layer's attention part, then its MLP part (mapping.plan_mapping).
# The q entries are mapped whenever present: V3 and V2-Lite checkpoints tell their variant by what they hold.
# The MLA down projections are column-parallel in the local and the patched TE spec, duplicated in the unpatched
# TE spec: one column layout serves both (converters/mcore/tp_layout.py).
LAYER_PARAMS: tuple[Param, ...] = (
    # TENorm's extra state: TE 2.20.2 + megatron-core 0.16.1 fail a load without it
    Param(("input_layernorm.weight",), "input_layernorm.weight", shape=("hidden_size",), extra_state=te_norm(8)),
    # a dense layer's TE spec fuses the norm into linear_fc1 (whose extra state covers it)
    Param(("post_attention_layernorm.weight",), "mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight", shape=("hidden_size",),
          layers=DENSE),
    Param(("post_attention_layernorm.weight",), "pre_mlp_layernorm.weight", shape=("hidden_size",), layers=MOE, extra_state=te_norm(9)),
    Param(("self_attn.q_a_proj.weight",), "self_attention.linear_q_down_proj.weight", shape=("q_lora_rank", "hidden_size"), tp=COLUMN,
          when=has_q_lora, required=False, extra_state=ExtraState(3), fp8=True),
    Param(("self_attn.q_a_layernorm.weight",), "self_attention.linear_q_up_proj.layer_norm_weight", "self_attention.q_layernorm.weight",
          shape=("q_lora_rank",), when=has_q_lora, required=False),
    Param(("self_attn.q_b_proj.weight",), "self_attention.linear_q_up_proj.weight", shape=("q_heads", "q_lora_rank"), tp=COLUMN,
          when=has_q_lora, required=False, extra_state=ExtraState(4), fp8=True),
    Param(("self_attn.q_proj.weight",), "self_attention.linear_q_proj.weight", shape=("q_heads", "hidden_size"), tp=COLUMN,
          when=has_q_proj, required=False, extra_state=ExtraState(5), fp8=True),
    Param(("self_attn.kv_a_proj_with_mqa.weight",), "self_attention.linear_kv_down_proj.weight", shape=("kv_lora_rank+rope", "hidden_size"),
          tp=COLUMN, extra_state=ExtraState(1), fp8=True),
    Param(("self_attn.kv_a_layernorm.weight",), "self_attention.linear_kv_up_proj.layer_norm_weight", "self_attention.kv_layernorm.weight",
          shape=("kv_lora_rank",)),
    Param(("self_attn.kv_b_proj.weight",), "self_attention.linear_kv_up_proj.weight", shape=("kv_heads", "kv_lora_rank"), tp=COLUMN,
          extra_state=ExtraState(2), fp8=True),
    Param(("self_attn.o_proj.weight",), "self_attention.linear_proj.weight", shape=("hidden_size", "o_in"), tp=ROW, extra_state=ExtraState(0), fp8=True),
    # SwiGLU: mcore's linear_fc1 is cat(gate, up) whatever the TP; TP splits each half on its own
    Param(("mlp.gate_proj.weight", "mlp.up_proj.weight"), "mlp.linear_fc1.weight", shape=("intermediate_size", "hidden_size"), tp=COLUMN, layers=DENSE,
          extra_state=ExtraState(6), fp8=True),
    Param(("mlp.down_proj.weight",), "mlp.linear_fc2.weight", shape=("hidden_size", "intermediate_size"), tp=ROW, layers=DENSE, extra_state=ExtraState(7), fp8=True),
    Param(("mlp.gate.weight",), "mlp.router.weight", shape=("n_routed_experts", "hidden_size"), layers=MOE),
    Param(("mlp.gate.e_score_correction_bias",), "mlp.router.expert_bias", shape=("n_routed_experts",), layers=MOE, when=has_expert_bias,
          float32=True),
    Param(("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"), "mlp.shared_experts.linear_fc1.weight",
          shape=("shared", "hidden_size"), tp=COLUMN, layers=MOE, when=has_shared_experts, extra_state=ExtraState(6), fp8=True),
    Param(("mlp.shared_experts.down_proj.weight",), "mlp.shared_experts.linear_fc2.weight", shape=("hidden_size", "shared"), tp=ROW,
          layers=MOE, when=has_shared_experts, extra_state=ExtraState(7), fp8=True),
    # routed experts: one tensor per projection, expert axis first; one extra-state object per expert
    Param(("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"), "mlp.experts.experts.linear_fc1.weight",
          shape=("moe_intermediate_size", "hidden_size"), tp=COLUMN, layers=MOE, extra_state=ExtraState(10), fp8=True),
    Param(("mlp.experts.{e}.down_proj.weight",), "mlp.experts.experts.linear_fc2.weight", shape=("hidden_size", "moe_intermediate_size"), tp=ROW,
          layers=MOE, extra_state=ExtraState(11), fp8=True),
)

MTP_PARAMS: tuple[Param, ...] = (
    Param(("enorm.weight",), "enorm.weight", shape=("hidden_size",), extra_state=te_norm(1)),
    Param(("hnorm.weight",), "hnorm.weight", shape=("hidden_size",), extra_state=te_norm(2)),
    Param(("eh_proj.weight",), "eh_proj.weight", shape=("hidden_size", "2*hidden_size"), tp=COLUMN, extra_state=ExtraState(0)),
    Param(("shared_head.norm.weight",), "final_layernorm.weight", shape=("hidden_size",), extra_state=te_norm(3)),
    Param(("embed_tokens.weight",), None, shape=("vocab_size", "hidden_size"), copy_of=("model.embed_tokens.weight",)),
    Param(("shared_head.head.weight",), None, shape=("vocab_size", "hidden_size"), copy_of=("lm_head.weight", "model.embed_tokens.weight")),
    # megatron-core 0.16.1 (TE 2.20.2) also asks for the MTP layer's TEDotProductAttention extra state (not the
    # decoder layers'; 0.19.2 asks for neither): seen on 2x H200, tests/data/te_keys/
    Param((), None, extra_state=ExtraState(4, te_only=True, module="transformer_layer.self_attention.core_attention")),
)


def layer_params(kind: str) -> list[Param]:
    """The LAYER_PARAMS of a dense or a MoE decoder layer, in table order."""
    return [param for param in LAYER_PARAMS if param.layers in (EVERY, kind)]


def extra_state_module(param: Param, spec: str) -> str | None:
    """The module whose `_extra_state` this parameter brings in `spec`, or None."""
    rule = param.extra_state
    if rule is None or (rule.te_only and spec != "te"):
        return None
    return rule.module or param.mcore(spec).rsplit(".", 1)[0]


def hf_shape(param: Param, sizes: dict[str, int | None]) -> tuple[int, ...]:
    """The shape of each of the parameter's HF tensors; KeyError names a config.json key it needs and lacks."""
    if any(sizes[dim] is None for dim in param.shape):
        raise KeyError(next(dim for dim in param.shape if sizes[dim] is None))
    return tuple(sizes[dim] for dim in param.shape)


def hf_tensors(config: dict[str, Any], mtp_layers: int) -> Iterator[tuple[str, Param]]:
    """Every HF tensor name a DeepSeek-V3-class model of this config has (MTP layers: `mtp_layers`), with its entry."""
    layers = config["num_hidden_layers"]
    experts = config.get("n_routed_experts") or 0
    yield from ((name, param) for param in GLOBAL_PARAMS if param.applies(config) for name in param.hf)
    moe = moe_layer_freq(config) + [1] * mtp_layers  # DeepSeek-V3's MTP layer is a MoE layer
    for i in range(layers + mtp_layers):
        prefix = f"model.layers.{i}."
        params = [param for param in layer_params(MOE if moe[i] else DENSE) if param.applies(config)]
        yield from ((prefix + name, param) for param in params if not param.stacked for name in param.hf)
        # HF keeps each expert as a module: its projections are listed expert by expert
        for e in range(experts if moe[i] else 0):
            yield from ((prefix + name.format(e=e), param) for param in params if param.stacked for name in param.hf)
        if i >= layers:
            yield from ((prefix + name, param) for param in MTP_PARAMS for name in param.hf)


def hf_tensor_shapes(config: dict[str, Any], mtp_layers: int) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name and shape a DeepSeek-V3-class model of this config has (MTP layers: `mtp_layers`)."""
    sizes = dims(config)
    return {name: hf_shape(param, sizes) for name, param in hf_tensors(config, mtp_layers)}


def release_fp8_names(config: dict[str, Any], mtp_layers: int) -> set[str]:
    """The tensors DeepSeek's FP8 release stores as e4m3 + scale_inv (the 2-D projections of attention and MLP,
    the MTP layer's included; never norms, router, embeddings, the head or the MTP eh_proj)."""
    return {name for name, param in hf_tensors(config, mtp_layers) if param.fp8}


def sharding_table() -> dict[str, tuple[str, bool]]:
    """mcore name (after its layer prefix) in either spec -> (COLUMN, ROW or REPLICATED, split over ETP not TP)."""
    table: dict[str, tuple[str, bool]] = {}
    for param in GLOBAL_PARAMS + LAYER_PARAMS + MTP_PARAMS:
        for spec in SPECS:
            if param.mcore(spec) is not None:
                table[param.mcore(spec)] = (param.tp, param.stacked)
    return table


def te_keys_map(dense: bool) -> dict[str, str]:
    """Local-spec module names -> the TE spec's fused names (Megatron's sharded_state_dict_keys_map) for a layer."""
    return {
        param.local.removesuffix("weight"): param.te.removesuffix("weight")
        for param in layer_params(DENSE if dense else MOE)
        if param.local and param.local != param.te
    }


def _spec_markers() -> dict[str, tuple[str, ...]]:
    # names that differ by spec on every layer of every model of the family (q_lora_rank null has no q norm)
    marking = [param for param in LAYER_PARAMS if param.layers == EVERY and param.when is None and param.local]
    return {spec: tuple(param.mcore(spec) for param in marking) for spec in SPECS}


SPEC_MARKERS = _spec_markers()


def checkpoint_spec(keys: Iterable[str]) -> str | None:
    """Which spec's names a checkpoint's keys use (te, local), from its fused or unfused attention norms; None: neither."""
    for spec, markers in SPEC_MARKERS.items():
        if any(key.endswith(marker) for key in keys for marker in markers):
            return spec
    return None
