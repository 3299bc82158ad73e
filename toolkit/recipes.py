"""Parallel sizes of a GRPO run (the `Plan`) and the named known-good recipes.

On the ground floor because `convert hf-mcore --recipe` cuts the checkpoint's chunks for a recipe's
TP/ETP, and `launch plan` checks, searches and prints plans (`launch.plan`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Plan:
    nodes: int
    gpus_per_node: int
    gpu_mem_gb: float
    tp: int
    pp: int
    ep: int
    etp: int
    cp: int = 1
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None
    rollout_tp: int = 8
    gpu_memory_utilization: float = 0.6
    param_offload: bool = True
    grad_offload: bool = True
    optimizer_offload: bool = True
    optimizer_offload_fraction: float | None = None
    micro_batch_size: int = 1
    recipe: str | None = None
    model: str | None = None  # the preset (toolkit.presets) a recipe was published for
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp * self.cp)

    @property
    def vllm_engines(self) -> int:
        return self.world // self.rollout_tp


# Known-good plans (../shared/REFERENCE.md section 5): reproduced exactly, never re-derived.
RECIPES: dict[str, Plan] = {
    # the seed how-to (Pai-Megatron-Patch) on 16 x 8 GPUs
    "pai-16x8": Plan(16, 8, 96, tp=4, pp=16, ep=2, etp=4, first_stage_layers=3, last_stage_layers=2, rollout_tp=32,
                     gpu_memory_utilization=0.6, extra={"lr": 2e-7, "rollout_n": 2}, recipe="pai-16x8", model="deepseek-v3"),
    # verl's documented DeepSeek-V3 plans on H20 (96 GB)
    "verl-h20-12": Plan(12, 8, 96, tp=8, pp=12, ep=8, etp=1, last_stage_layers=6, rollout_tp=32, recipe="verl-h20-12", model="deepseek-v3"),
    "verl-h20-16": Plan(16, 8, 96, tp=8, pp=16, ep=8, etp=1, last_stage_layers=1, rollout_tp=32,
                        optimizer_offload_fraction=0.5, recipe="verl-h20-16", model="deepseek-v3"),
    "verl-h20-32": Plan(32, 8, 96, tp=8, pp=16, ep=8, etp=1, last_stage_layers=1, rollout_tp=32, recipe="verl-h20-32", model="deepseek-v3"),
    "verl-h20-64": Plan(64, 8, 96, tp=1, pp=16, ep=32, etp=1, last_stage_layers=1, rollout_tp=32, recipe="verl-h20-64", model="deepseek-v3"),
    # Moonlight-16B-A3B. verl's GRPO example (volcengine/verl examples/grpo_trainer/run_moonlight16b_math_megatron.sh):
    # 3 x 8 GPUs, TP4 PP3 EP4 ETP1, vLLM TP4 at 0.6, micro batch 16, no offload (verl's defaults; GPU not stated)
    "verl-moonlight-3x8": Plan(3, 8, 80, tp=4, pp=3, ep=4, etp=1, rollout_tp=4, gpu_memory_utilization=0.6,
                               param_offload=False, grad_offload=False, optimizer_offload=False, micro_batch_size=16,
                               recipe="verl-moonlight-3x8", model="moonlight-16b-a3b"),
    # Pai-Megatron-Patch's verl script for Moonlight (examples/moonlight/run_mcore_moonlight_verl.sh, its env defaults):
    # one node of 8, TP4 PP1 EP2 ETP2, vLLM TP8 at 0.75 (GPU not stated; offloads as our defaults)
    "pai-moonlight-1x8": Plan(1, 8, 80, tp=4, pp=1, ep=2, etp=2, rollout_tp=8, gpu_memory_utilization=0.75,
                              recipe="pai-moonlight-1x8", model="moonlight-16b-a3b"),
    # Kimi-K2: no published verl + vLLM layout (searched 2026-12-05: verl, Megatron-Bridge, Pai-Megatron-Patch, slime,
    # miles). slime's 32 x 8 (TP8 PP8 EP32 CP4) rolls out with 16-GPU SGLang engines; a vLLM engine of that size would
    # hold 128 GB of BF16 weights per GPU, so it is not a recipe here: `launch plan --model kimi-k2 --nodes 32` derives one.
}
