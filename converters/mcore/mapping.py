"""HF DeepSeek-V3-class tensors -> the Megatron-Core tensors and objects of a torch_dist checkpoint.

The names, shapes and extra-state rules come from the model description (converters/mcore/params.py);
this module turns them into a plan for one checkpoint. Every mcore tensor is stored at its global shape,
so the plan is independent of TP/PP/EP. The two transforms are named functions: `concatenated` (SwiGLU
`linear_fc1` = `cat(gate, up)` along dim 0, one chunk per source) and `stacked` (routed experts along a
leading expert axis, one chunk per expert and projection). Other tensors are copied whole, big ones cut
into row chunks so that no chunk is large.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from converters.mcore.config import moe_layer_freq
from converters.mcore.params import (
    DENSE,
    EVERY,
    GLOBAL_PARAMS,
    MOE,
    MTP_PARAMS,
    SPECS,
    Param,
    extra_state_module,
    hf_tensor_shapes,
    layer_params,
)
from toolkit.errors import ConvertError

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


def concatenated(key: str, sources: list[str], shapes: dict[str, tuple[int, ...]]) -> McoreTensor:
    """One mcore tensor made of several HF tensors one after another along dim 0 (SwiGLU: gate, then up)."""
    first = shapes[sources[0]]
    tensor = McoreTensor(key, (sum(shapes[source][0] for source in sources), first[1]))
    row = 0
    for source in sources:
        tensor.chunks.append(Chunk((row, 0), shapes[source], source))
        row += shapes[source][0]
    return tensor


def stacked(key: str, groups: list[list[str]], shapes: dict[str, tuple[int, ...]]) -> McoreTensor:
    """One mcore tensor of the routed experts, expert axis first; each expert's sources concatenated along rows."""
    first = shapes[groups[0][0]]
    tensor = McoreTensor(key, (len(groups), sum(shapes[source][0] for source in groups[0]), first[1]))
    for e, group in enumerate(groups):
        row = 0
        for source in group:
            tensor.chunks.append(Chunk((e, row, 0), (1, *shapes[source]), source))
            row += shapes[source][0]
    return tensor


def _write_order(param: Param) -> tuple[int, int]:
    # a layer's attention part (the entries every layer has) before its MLP part; in each, whole tensors, then
    # concatenations, then expert stacks: the order checkpoints have always had (it decides their bytes)
    return (2 if param.stacked else 1 if len(param.hf) > 1 else 0, param.layers != EVERY)


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

    def add(param: Param, hf_prefix: str, mc_prefix: str) -> None:
        """The param's mcore tensor when the checkpoint has its sources; what is missing when the config says it must."""
        if param.mcore(spec) is None:
            return
        key = mc_prefix + param.mcore(spec)
        groups = [[hf_prefix + name.format(e=e) for name in param.hf] for e in range(experts if param.stacked else 1)]
        absent = [name for group in groups for name in group if name not in shapes]
        if absent:
            if param.required and param.applies(config):
                missing.extend(absent)
            return
        if param.stacked:
            tensors.append(stacked(key, groups, shapes))
        elif len(param.hf) > 1:
            tensors.append(concatenated(key, groups[0], shapes))
        else:
            tensors.append(_whole(key, groups[0][0], shapes[groups[0][0]], 4 if param.float32 else 2, 128))
        used.update(name for group in groups for name in group)

    def extra_state(params: list[Param], mc_prefix: str) -> None:
        for param in sorted(params, key=lambda param: param.extra_state.position if param.extra_state else 0):
            module = extra_state_module(param, spec)
            if module is None or not param.applies(config):
                continue
            if param.stacked:  # per-expert objects, keyed with the expert offset
                objects.extend(f"{mc_prefix}{module}._extra_state/shard_{e}_{experts}" for e in range(experts))
            else:
                objects.append(_object_key(mc_prefix + module))

    def layer(hf_prefix: str, mc_prefix: str, is_moe: bool) -> None:
        params = layer_params(MOE if is_moe else DENSE)
        for param in sorted(params, key=_write_order):
            add(param, hf_prefix, mc_prefix)
        extra_state(params, mc_prefix)

    for param in GLOBAL_PARAMS:
        add(param, "", "")
    extra_state(list(GLOBAL_PARAMS), "")
    for i in range(layers):
        layer(f"model.layers.{i}.", f"decoder.layers.{i}.", bool(moe[i]))
    for k in range(mtp_layers):
        hf_prefix, mc_prefix = f"model.layers.{layers + k}.", f"mtp.layers.{k}."
        for param in MTP_PARAMS:
            add(param, hf_prefix, mc_prefix)
            # its copies of the embedding and the head are not written, but they are accounted for
            used.update(hf_prefix + name for name in param.hf if param.copy_of and hf_prefix + name in shapes)
        extra_state(list(MTP_PARAMS), mc_prefix)
        # the MTP layer is MoE when its checkpoint says so (DeepSeek-V3: always)
        layer(hf_prefix, mc_prefix + "transformer_layer.", is_moe=f"{hf_prefix}mlp.gate.weight" in shapes)
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise MappingError(f"{len(missing)} tensor(s) that config.json implies are missing from the checkpoint: {shown}")
    return MappingPlan(tensors, objects, used)


def check_shapes(config: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Disagreements between config.json and the stored shapes of a few telling tensors, as messages (empty: consistent)."""
    expected = hf_tensor_shapes(config, 0)
    dense = config.get("first_k_dense_replace", 0)
    telling = ["model.embed_tokens.weight", "model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "model.layers.0.self_attn.o_proj.weight",
               "model.layers.0.self_attn.q_a_proj.weight", f"model.layers.{dense}.mlp.experts.0.down_proj.weight"]
    return [f"{name} is {list(shapes[name])} but config.json implies {list(expected[name])}"
            for name in telling if name in shapes and name in expected and tuple(shapes[name]) != expected[name]]
