"""Parallelism plans for GRPO of DeepSeek-V3-class models: rules, recipe checks, a memory estimate.

A plan is TP/PP/EP/ETP/CP for Megatron training, the PP stage layer split, the vLLM rollout TP and
engine count, offload flags, and a per-GPU memory estimate with the reasoning behind each term.
Recipes reproduce known-good plans exactly; otherwise the search takes the smallest model-parallel
layout that fits, and refuses with the smallest node count that would work. The `Plan` itself and the
named recipes live in `toolkit.recipes`, where `convert hf-mcore --recipe` reads them too.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from converters.mcore.config import moe_layer_freq
from converters.mcore.params import hf_tensor_shapes
from toolkit.presets import PRESETS, preset_config
from toolkit.recipes import RECIPES, Plan

GB = 1e9
# vLLM's weights may take this much of its gpu_memory_utilization share (the rest: KV cache, activations)
ROLLOUT_WEIGHT_SHARE = 0.85


class PlanError(ValueError):
    """The request cannot be planned; the message says why and what would work."""


def load_model_config(model: str) -> dict[str, Any]:
    """A HF dir's config.json, or a preset by name."""
    if model in PRESETS:
        return preset_config(model)
    path = Path(model) / "config.json" if Path(model).is_dir() else Path(model)
    if not path.is_file():
        raise PlanError(f"{model}: neither a HF model dir, a config.json, nor a preset ({', '.join(sorted(PRESETS))})")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class ParamCounts:
    dense: int  # everything but routed experts (replicated over EP, split over TP)
    experts: int  # routed experts (split over EP x ETP)
    embedding: int  # input embedding + output head


def count_params(config: dict[str, Any]) -> ParamCounts:
    """Parameters of the model without its MTP layers (the size a release is named by)."""
    return _count_params(json.dumps(config, sort_keys=True, default=str))


@lru_cache(maxsize=32)
def _count_params(config_json: str) -> ParamCounts:
    # cached: the plan search estimates memory for ~200 layouts (x every node count when it looks for the
    # smallest feasible cluster), and listing Kimi-K2's 70k tensor shapes takes ~0.2 s each time
    config = json.loads(config_json)
    shapes = hf_tensor_shapes(config, 0)
    experts = sum(math.prod(s) for n, s in shapes.items() if ".mlp.experts." in n)
    embedding = sum(math.prod(s) for n, s in shapes.items() if n in ("model.embed_tokens.weight", "lm_head.weight"))
    total = sum(math.prod(s) for s in shapes.values())
    return ParamCounts(total - experts, experts, embedding)


def check_rules(plan: Plan, config: dict[str, Any]) -> list[str]:
    """Every Megatron divisibility rule the plan breaks, as sentences (empty: valid)."""
    problems = []
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    experts = config.get("n_routed_experts") or 0
    if plan.world % (plan.tp * plan.pp * plan.cp):
        problems.append(f"{plan.world} GPUs are not divisible by TP x PP x CP = {plan.tp * plan.pp * plan.cp}")
    if plan.world % (plan.ep * plan.etp * plan.pp):
        problems.append(f"{plan.world} GPUs are not divisible by EP x ETP x PP = {plan.ep * plan.etp * plan.pp}")
    if heads % plan.tp:
        problems.append(f"{heads} attention heads are not divisible by TP={plan.tp}")
    if experts and experts % plan.ep:
        problems.append(f"{experts} experts are not divisible by EP={plan.ep}")
    if plan.gpus_per_node % min(plan.tp, plan.gpus_per_node) or plan.tp > plan.gpus_per_node:
        problems.append(f"TP={plan.tp} does not fit inside a node of {plan.gpus_per_node} GPUs")
    problems += _stage_problems(plan, layers)
    if plan.world % plan.rollout_tp:
        problems.append(f"{plan.world} GPUs are not divisible by rollout TP={plan.rollout_tp}")
    return problems


def _stage_problems(plan: Plan, layers: int) -> list[str]:
    first, last, pp = plan.first_stage_layers, plan.last_stage_layers, plan.pp
    if pp == 1:
        return [] if first is None and last is None else ["first/last stage layers need PP > 1"]
    middle_stages = pp - (first is not None) - (last is not None)
    middle_layers = layers - (first or 0) - (last or 0)
    if middle_stages <= 0:
        return [] if middle_layers == 0 else [f"first + last stage layers must add up to {layers} with PP=2"]
    if middle_layers <= 0 or middle_layers % middle_stages:
        return [f"{middle_layers} layers do not split evenly over the {middle_stages} other pipeline stages (PP={pp}, first={first}, last={last})"]
    return []


def stage_split(layers: int, pp: int) -> tuple[int | None, int | None]:
    """First/last stage layer counts that make PP stages even (None: no override needed)."""
    if pp == 1 or layers % pp == 0:
        return None, None
    for last in range(1, layers // pp + 1):  # fewer layers on the last stage: it also holds the head and MTP
        if (layers - last) % (pp - 1) == 0:
            return None, last
    for first in range(1, layers):
        for last in range(1, layers - first):
            if (layers - first - last) % (pp - 2) == 0:
                return first, last
    raise PlanError(f"{layers} layers cannot be split over PP={pp}")


def estimate_memory(plan: Plan, config: dict[str, Any], sequence: int = 4096) -> dict[str, Any]:
    """Per-GPU memory in GB during training, with the assumption behind each term."""
    params = count_params(config)
    dense_local = params.dense / (plan.tp * plan.pp)
    expert_local = params.experts / (plan.ep * plan.etp * plan.pp)
    local = dense_local + expert_local
    expert_dp = plan.world // (plan.ep * plan.etp * plan.pp)
    optimizer_local = 12 * (dense_local / max(plan.dp, 1) + expert_local / max(expert_dp, 1))
    layers_per_stage = -(-config["num_hidden_layers"] // plan.pp)
    activations = 2 * sequence * plan.micro_batch_size * config["hidden_size"] * layers_per_stage * 2 / plan.tp / plan.cp
    terms = {
        "weights_bf16": 2 * local,
        "gradients_bf16": 2 * local,
        "optimizer_fp32_sharded": 0.0 if plan.optimizer_offload and not plan.optimizer_offload_fraction else optimizer_local * (1 - (plan.optimizer_offload_fraction or 0)),
        "activations_recomputed": activations,
    }
    estimate = {k: round(v / GB, 1) for k, v in terms.items()}
    training = sum(terms.values()) / GB
    vllm = plan.gpu_memory_utilization * plan.gpu_mem_gb
    rollout_weights = 2 * (params.dense + params.experts) / plan.rollout_tp / GB
    estimate.update(
        training_total=round(training, 1),
        vllm_share=round(vllm, 1),
        rollout_weights_per_gpu=round(rollout_weights, 1),
        reasoning=[
            f"{(params.dense + params.experts) / 1e9:.0f}B parameters: {params.experts / 1e9:.0f}B in routed experts (split over EP x ETP x PP = {plan.ep * plan.etp * plan.pp}), "
            f"{params.dense / 1e9:.1f}B elsewhere (split over TP x PP = {plan.tp * plan.pp})",
            f"weights and gradients in bf16: 2 bytes each per local parameter ({local / 1e9:.2f}B local)",
            f"Adam in fp32 (master, m, v: 12 bytes) sharded over DP={plan.dp} (experts over expert-DP={expert_dp})"
            + ("; offloaded to CPU" if plan.optimizer_offload and not plan.optimizer_offload_fraction else ""),
            f"activations with full recompute: ~2 x seq {sequence} x micro-batch {plan.micro_batch_size} x hidden x {layers_per_stage} layers/stage, bf16",
            f"vLLM takes gpu_memory_utilization {plan.gpu_memory_utilization} x {plan.gpu_mem_gb:.0f} GB; its weights are {rollout_weights:.1f} GB per GPU at rollout TP {plan.rollout_tp}",
            "with param/grad/optimizer offload, training state leaves the GPU while vLLM generates, so the two phases do not add up",
        ],
    )
    estimate["fits_rollout"] = rollout_weights <= vllm * ROLLOUT_WEIGHT_SHARE
    estimate["fits"] = training <= plan.gpu_mem_gb * 0.9 and estimate["fits_rollout"]
    return estimate


def _rollout_tp(config: dict[str, Any], gpu_mem_gb: float, utilization: float, world: int) -> int:
    params = count_params(config)
    need = 2 * (params.dense + params.experts) / GB / (gpu_mem_gb * utilization * ROLLOUT_WEIGHT_SHARE)
    tp = 1
    while tp < need:
        tp *= 2
    if tp > world:
        raise PlanError(f"the model needs a vLLM engine of {tp} GPUs; only {world} GPUs in total")
    return tp


def auto_plan(config: dict[str, Any], nodes: int, gpus_per_node: int, gpu_mem_gb: float) -> Plan:
    """The smallest model-parallel layout (TP <= node, PP, EP) that obeys the rules and fits."""
    world = nodes * gpus_per_node
    experts = config.get("n_routed_experts") or 1
    layers = config["num_hidden_layers"]
    rollout_tp = _rollout_tp(config, gpu_mem_gb, 0.6, world)
    candidates = []
    for tp in (1, 2, 4, 8):
        for pp in (1, 2, 4, 8, 12, 16, 32):
            for ep in (1, 2, 4, 8, 16, 32, 64):
                if ep > experts or tp > gpus_per_node:
                    continue
                try:
                    first, last = stage_split(layers, pp)
                except PlanError:
                    continue
                plan = Plan(nodes, gpus_per_node, gpu_mem_gb, tp=tp, pp=pp, ep=ep, etp=1,
                            first_stage_layers=first, last_stage_layers=last, rollout_tp=rollout_tp)
                if check_rules(plan, config) or not estimate_memory(plan, config)["fits"]:
                    continue
                candidates.append((tp * pp, pp, -ep, plan))
    if not candidates:
        raise PlanError(f"no valid plan on {nodes} node(s) of {gpus_per_node} x {gpu_mem_gb:.0f} GB")
    return min(candidates, key=lambda c: c[:3])[3]


def make_plan(model: str, nodes: int, gpus_per_node: int = 8, gpu_mem_gb: float = 80, recipe: str | None = None) -> tuple[Plan, dict[str, Any]]:
    """A recipe as given (checked), or the auto plan; refuses with the smallest node count that works."""
    config = load_model_config(model)
    if recipe is not None:
        if recipe not in RECIPES:
            raise PlanError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
        plan = RECIPES[recipe]
        if (plan.nodes, plan.gpus_per_node) != (nodes, gpus_per_node):
            raise PlanError(f"recipe {recipe} is for {plan.nodes} nodes x {plan.gpus_per_node} GPUs, not {nodes} x {gpus_per_node}")
        plan = replace(plan, gpu_mem_gb=gpu_mem_gb)
        problems = check_rules(plan, config)
        memory = estimate_memory(plan, config)
        if not memory["fits_rollout"]:
            problems.append(f"vLLM's BF16 weights are {memory['rollout_weights_per_gpu']} GB per GPU at rollout TP {plan.rollout_tp}, "
                            f"more than {ROLLOUT_WEIGHT_SHARE:.0%} of its {memory['vllm_share']} GB share")
        if problems:
            raise PlanError(f"recipe {recipe} does not suit this model: " + "; ".join(problems))
        return plan, config
    try:
        return auto_plan(config, nodes, gpus_per_node, gpu_mem_gb), config
    except PlanError as exc:
        for more in range(nodes + 1, 1025):
            try:
                auto_plan(config, more, gpus_per_node, gpu_mem_gb)
            except PlanError:
                continue
            raise PlanError(f"{exc}; the smallest feasible cluster is {more} nodes of {gpus_per_node} x {gpu_mem_gb:.0f} GB") from exc
        raise


def plan_report(plan: Plan, config: dict[str, Any]) -> dict[str, Any]:
    report = asdict(plan)
    report.update(world=plan.world, dp=plan.dp, vllm_engines=plan.vllm_engines, memory_gb=estimate_memory(plan, config))
    report["moe_layers"] = sum(moe_layer_freq(config))
    return report


def print_plan(plan: Plan, report: dict[str, Any]) -> None:
    memory = report["memory_gb"]
    print(f"{plan.nodes} nodes x {plan.gpus_per_node} GPUs ({plan.gpu_mem_gb:.0f} GB){' — recipe ' + plan.recipe if plan.recipe else ''}")
    print(f"  training: TP={plan.tp} PP={plan.pp} EP={plan.ep} ETP={plan.etp} CP={plan.cp} DP={plan.dp}"
          f"  first/last stage layers: {plan.first_stage_layers}/{plan.last_stage_layers}")
    print(f"  rollout:  vLLM TP={plan.rollout_tp}, {plan.vllm_engines} engines, gpu_memory_utilization {plan.gpu_memory_utilization}")
    print(f"  offload:  param={plan.param_offload} grad={plan.grad_offload} optimizer={plan.optimizer_offload}"
          + (f" (fraction {plan.optimizer_offload_fraction})" if plan.optimizer_offload_fraction else ""))
    print(f"  checkpoint layout: convert hf-mcore ... --align-tp {plan.tp} --align-etp {plan.etp}"
          + (f" (or --recipe {plan.recipe})" if plan.recipe else "") + ": each rank then reads only its own slices")
    print("  memory per GPU (GB): " + ", ".join(f"{k} {v}" for k, v in memory.items() if isinstance(v, float)))
    for line in memory["reasoning"]:
        print(f"    - {line}")


def plan_command(model: str, nodes: int, gpus_per_node: int, gpu_mem_gb: float, recipe: str | None, as_json: bool) -> int:
    """`launch plan`: print the plan (or JSON); 2 when the request is impossible."""
    try:
        plan, config = make_plan(model, nodes, gpus_per_node, gpu_mem_gb, recipe)
    except PlanError as exc:
        print(f"launch plan: error: {exc}", file=sys.stderr)
        return 2
    report = plan_report(plan, config)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_plan(plan, report)
    return 0
