"""HF DeepSeek-V3-class tensor names -> Megatron-Core sharded keys: a table plus two named transforms.

Every mcore tensor is stored at its global shape, so the mapping is independent of TP/PP/EP. The
two transforms are data too: SwiGLU `linear_fc1` is `cat(gate, up)` along dim 0 (written as two
chunks, one per source), and routed experts stack along a leading expert axis (one chunk per expert
and projection). Big tensors are further cut into row chunks so that no chunk is large.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from converters.mcore.config import moe_layer_freq
from toolkit.errors import ConvertError

SPECS = ("te", "local")

# (HF name under model.layers.{i}., mcore name under decoder.layers.{i}.) -- spec-dependent ones are dicts
ATTENTION: list[tuple[str, str | dict[str, str]]] = [
    ("input_layernorm.weight", "input_layernorm.weight"),
    ("self_attn.q_a_proj.weight", "self_attention.linear_q_down_proj.weight"),
    ("self_attn.q_a_layernorm.weight", {"te": "self_attention.linear_q_up_proj.layer_norm_weight", "local": "self_attention.q_layernorm.weight"}),
    ("self_attn.q_b_proj.weight", "self_attention.linear_q_up_proj.weight"),
    ("self_attn.q_proj.weight", "self_attention.linear_q_proj.weight"),  # q_lora_rank null (V2-Lite)
    ("self_attn.kv_a_proj_with_mqa.weight", "self_attention.linear_kv_down_proj.weight"),
    ("self_attn.kv_a_layernorm.weight", {"te": "self_attention.linear_kv_up_proj.layer_norm_weight", "local": "self_attention.kv_layernorm.weight"}),
    ("self_attn.kv_b_proj.weight", "self_attention.linear_kv_up_proj.weight"),
    ("self_attn.o_proj.weight", "self_attention.linear_proj.weight"),
]
DENSE_MLP: list[tuple[str, str | dict[str, str]]] = [
    ("post_attention_layernorm.weight", {"te": "mlp.linear_fc1.layer_norm_weight", "local": "pre_mlp_layernorm.weight"}),
    ("mlp.down_proj.weight", "mlp.linear_fc2.weight"),
]
MOE_MLP: list[tuple[str, str | dict[str, str]]] = [
    ("post_attention_layernorm.weight", "pre_mlp_layernorm.weight"),
    ("mlp.gate.weight", "mlp.router.weight"),
    ("mlp.gate.e_score_correction_bias", "mlp.router.expert_bias"),
    ("mlp.shared_experts.down_proj.weight", "mlp.shared_experts.linear_fc2.weight"),
]
# SwiGLU: mcore fc1 <- (HF gate, HF up)
GATE_UP: list[tuple[str, tuple[str, str]]] = [
    ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    ("mlp.shared_experts.linear_fc1.weight", ("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight")),
]
# routed experts: mcore stacked key <- HF per-expert names ({e} = expert index)
EXPERTS: list[tuple[str, tuple[str, ...]]] = [
    ("mlp.experts.experts.linear_fc1.weight", ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight")),
    ("mlp.experts.experts.linear_fc2.weight", ("mlp.experts.{e}.down_proj.weight",)),
]
GLOBAL: list[tuple[str, str]] = [
    ("model.embed_tokens.weight", "embedding.word_embeddings.weight"),
    ("model.norm.weight", "decoder.final_layernorm.weight"),
    ("lm_head.weight", "output_layer.weight"),
]
# MTP module k is HF layer num_hidden_layers + k; its decoder layer goes under transformer_layer.
MTP: list[tuple[str, str]] = [
    ("enorm.weight", "enorm.weight"),
    ("hnorm.weight", "hnorm.weight"),
    ("eh_proj.weight", "eh_proj.weight"),
    ("shared_head.norm.weight", "final_layernorm.weight"),
]
# in the MTP layer these duplicate the main model's and are not written
MTP_DUPLICATES = ("embed_tokens.weight", "shared_head.head.weight")

# Modules whose `_extra_state` a loader asks for: Megatron's local linears and every Transformer
# Engine module carry one (FP8 scaling state; None outside FP8 training). Keys a model does not ask
# for are ignored on load, a key it asks for and the checkpoint lacks is an error.
EXTRA_STATE_MODULES = (
    "self_attention.linear_proj",
    "self_attention.linear_kv_down_proj",
    "self_attention.linear_kv_up_proj",
)
# q_lora_rank set: a down/up pair; q_lora_rank null (V2-Lite): one linear_q_proj
Q_LORA_EXTRA_STATE = ("self_attention.linear_q_down_proj", "self_attention.linear_q_up_proj")
Q_PROJ_EXTRA_STATE = ("self_attention.linear_q_proj",)
DENSE_EXTRA_STATE = ("mlp.linear_fc1", "mlp.linear_fc2")
MOE_EXTRA_STATE = ("mlp.shared_experts.linear_fc1", "mlp.shared_experts.linear_fc2")
EXPERT_EXTRA_STATE = ("mlp.experts.experts.linear_fc1", "mlp.experts.experts.linear_fc2")
# The TE spec's unfused norms are TENorm (te.pytorch.RMSNorm), a TE op with extra state of its own
# (seen with TE 2.20.2 + megatron-core 0.16.1: a load without these keys fails). The local spec's
# norms are plain torch modules and have none. Dense layers fuse pre_mlp_layernorm into linear_fc1.
TE_NORM_EXTRA_STATE = ("input_layernorm",)
TE_MOE_NORM_EXTRA_STATE = ("pre_mlp_layernorm",)
TE_GLOBAL_NORM_EXTRA_STATE = ("decoder.final_layernorm",)
TE_MTP_NORM_EXTRA_STATE = ("enorm", "hnorm", "final_layernorm")
# megatron-core 0.16.1 (TE 2.20.2) also asks for the MTP layer's TEDotProductAttention extra state
# (not the decoder layers'; 0.19.2 asks for neither): seen on 2x H200, tests/data/te_keys/.
TE_MTP_LAYER_EXTRA_STATE = ("transformer_layer.self_attention.core_attention",)

CHUNK_BYTES = 256 * 1024 * 1024


class MappingError(ConvertError, ValueError):
    """The HF checkpoint does not match its config or the table; the message lists what."""


@dataclass(frozen=True)
class Chunk:
    """One stored piece of an mcore tensor, made from one HF tensor (optionally a row and a column range of it)."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    source: str
    rows: tuple[int, int] | None = None
    cols: tuple[int, int] | None = None  # only in layouts aligned to tensor parallelism (converters/mcore/tp_layout.py)


@dataclass
class McoreTensor:
    key: str
    shape: tuple[int, ...]
    chunks: list[Chunk] = field(default_factory=list)


@dataclass
class MappingPlan:
    tensors: list[McoreTensor]
    objects: list[str]  # unique keys of ShardedObjects (`_extra_state`), payload None
    used_sources: set[str]


def _object_key(module: str) -> str:
    """The stored key of a module's replicated `_extra_state` ShardedObject (offset 0 of 1)."""
    return f"{module}._extra_state/shard_0_1"


def _pick(name: str | dict[str, str], spec: str) -> str:
    return name[spec] if isinstance(name, dict) else name


def _whole(key: str, source: str, shape: tuple[int, ...], itemsize: int, row_multiple: int) -> McoreTensor:
    """A tensor from one source, cut into row chunks of at most CHUNK_BYTES (rows a multiple of row_multiple)."""
    tensor = McoreTensor(key, shape)
    row_bytes = itemsize * (shape[1] if len(shape) > 1 else 1) if shape else itemsize
    if len(shape) < 2 or shape[0] * row_bytes <= CHUNK_BYTES:
        tensor.chunks.append(Chunk(tuple(0 for _ in shape), shape, source))
        return tensor
    step = max(row_multiple, CHUNK_BYTES // row_bytes // row_multiple * row_multiple)
    for start in range(0, shape[0], step):
        stop = min(shape[0], start + step)
        tensor.chunks.append(Chunk((start, *([0] * (len(shape) - 1))), (stop - start, *shape[1:]), source, (start, stop)))
    return tensor


def plan_mapping(config: dict[str, Any], shapes: dict[str, tuple[int, ...]], spec: str = "te", drop_mtp: bool = False) -> MappingPlan:
    """Every mcore tensor and object for a HF checkpoint with these tensor `shapes` (name -> shape)."""
    if spec not in SPECS:
        raise MappingError(f"unknown spec {spec!r}; use one of {', '.join(SPECS)}")
    layers = config["num_hidden_layers"]
    moe = moe_layer_freq(config)
    experts = config.get("n_routed_experts") or 0
    mtp_layers = 0 if drop_mtp else (config.get("num_nextn_predict_layers") or 0)
    tensors: list[McoreTensor] = []
    objects: list[str] = []
    used: set[str] = set()
    missing: list[str] = []

    def single(hf: str, key: str, required: bool = True, itemsize: int = 2) -> None:
        if hf not in shapes:
            if required:
                missing.append(hf)
            return
        used.add(hf)
        tensors.append(_whole(key, hf, shapes[hf], itemsize, 128))

    def layer(hf_prefix: str, mc_prefix: str, is_moe: bool) -> None:
        for hf, mc in ATTENTION:
            optional = hf in ("self_attn.q_a_proj.weight", "self_attn.q_a_layernorm.weight", "self_attn.q_b_proj.weight", "self_attn.q_proj.weight")
            single(hf_prefix + hf, mc_prefix + _pick(mc, spec), required=not optional)
        for hf, mc in MOE_MLP if is_moe else DENSE_MLP:
            single(hf_prefix + hf, mc_prefix + _pick(mc, spec), itemsize=4 if hf.endswith("bias") else 2)
        for key, (gate, up) in GATE_UP:
            if key.startswith("mlp.shared_experts.") != is_moe:
                continue
            if gate.startswith("mlp.shared_experts.") and not config.get("n_shared_experts"):
                continue
            gate, up = hf_prefix + gate, hf_prefix + up
            if gate not in shapes or up not in shapes:
                missing.extend(name for name in (gate, up) if name not in shapes)
                continue
            rows = shapes[gate][0]
            tensor = McoreTensor(mc_prefix + key, (rows + shapes[up][0], shapes[gate][1]))
            tensor.chunks += [Chunk((0, 0), shapes[gate], gate), Chunk((rows, 0), shapes[up], up)]
            used.update((gate, up))
            tensors.append(tensor)
        modules = EXTRA_STATE_MODULES + (Q_LORA_EXTRA_STATE if config.get("q_lora_rank") else Q_PROJ_EXTRA_STATE)
        modules += MOE_EXTRA_STATE if is_moe else DENSE_EXTRA_STATE
        if spec == "te":
            modules += TE_NORM_EXTRA_STATE + (TE_MOE_NORM_EXTRA_STATE if is_moe else ())
        objects.extend(_object_key(mc_prefix + module) for module in modules)
        if not is_moe:
            return
        for key, sources in EXPERTS:
            names = [[hf_prefix + s.format(e=e) for s in sources] for e in range(experts)]
            absent = [n for group in names for n in group if n not in shapes]
            if absent:
                missing.extend(absent)
                continue
            first = shapes[names[0][0]]
            width = sum(shapes[s][0] for s in names[0])
            tensor = McoreTensor(mc_prefix + key, (experts, width, first[1]))
            for e, group in enumerate(names):
                row = 0
                for source in group:
                    tensor.chunks.append(Chunk((e, row, 0), (1, *shapes[source]), source))
                    row += shapes[source][0]
                used.update(group)
            tensors.append(tensor)
        for module in EXPERT_EXTRA_STATE:
            objects.extend(f"{mc_prefix}{module}._extra_state/shard_{e}_{experts}" for e in range(experts))

    for hf, mc in GLOBAL:
        single(hf, mc, required=not (hf == "lm_head.weight" and config.get("tie_word_embeddings")))
    if spec == "te":
        objects.extend(_object_key(norm) for norm in TE_GLOBAL_NORM_EXTRA_STATE)
    for i in range(layers):
        layer(f"model.layers.{i}.", f"decoder.layers.{i}.", bool(moe[i]))
    for k in range(mtp_layers):
        hf_prefix, mc_prefix = f"model.layers.{layers + k}.", f"mtp.layers.{k}."
        for hf, mc in MTP:
            single(hf_prefix + hf, mc_prefix + mc)
        objects.append(_object_key(f"{mc_prefix}eh_proj"))
        if spec == "te":
            objects.extend(_object_key(mc_prefix + module) for module in TE_MTP_NORM_EXTRA_STATE + TE_MTP_LAYER_EXTRA_STATE)
        # the MTP layer is MoE when its checkpoint says so (DeepSeek-V3: always)
        layer(hf_prefix, mc_prefix + "transformer_layer.", is_moe=f"{hf_prefix}mlp.gate.weight" in shapes)
        used.update(hf_prefix + name for name in MTP_DUPLICATES if hf_prefix + name in shapes)
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise MappingError(f"{len(missing)} tensor(s) that config.json implies are missing from the checkpoint: {shown}")
    return MappingPlan(tensors, objects, used)


def check_shapes(config: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Disagreements between config.json and the stored shapes, as messages (empty: consistent)."""
    problems = []
    hidden = config["hidden_size"]
    expected = {
        "model.embed_tokens.weight": (config["vocab_size"], hidden),
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": (config["kv_lora_rank"] + config["qk_rope_head_dim"], hidden),
        "model.layers.0.self_attn.o_proj.weight": (hidden, config["num_attention_heads"] * config["v_head_dim"]),
    }
    if config.get("q_lora_rank"):
        expected["model.layers.0.self_attn.q_a_proj.weight"] = (config["q_lora_rank"], hidden)
    for name, shape in expected.items():
        if name in shapes and tuple(shapes[name]) != shape:
            problems.append(f"{name} is {list(shapes[name])} but config.json implies {list(shape)}")
    dense = config.get("first_k_dense_replace", 0)
    moe_layer = f"model.layers.{dense}.mlp.experts.0.down_proj.weight"
    if moe_layer in shapes and tuple(shapes[moe_layer]) != (hidden, config["moe_intermediate_size"]):
        problems.append(f"{moe_layer} is {list(shapes[moe_layer])} but config.json implies {[hidden, config['moe_intermediate_size']]}")
    return problems
