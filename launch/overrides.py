"""verl GRPO hydra overrides for a plan, in the dialect of the installed verl, and their validation.

The dialect differences (../shared/REFERENCE.md section 5): verl >= 0.8 selects Megatron with
`model_engine=megatron` (before: `--config-name ppo_megatron_trainer`); 0.9.1 rejects
`actor.megatron.grad_offload`; transformer-config keys need `++` (they are not in verl's schema).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.version import Version

from toolkit.recipes import Plan

ENTRYPOINT = ["-m", "verl.trainer.main_ppo"]
ROLES = ("actor", "ref")  # each builds its own Megatron model from its own megatron config
ROUTER_STABILITY = {  # Pai's settings for DeepSeek-V3: keep the checkpoint's routing
    "moe_router_dtype": "fp32",
    "moe_aux_loss_coeff": 0.0,
    "moe_router_load_balancing_type": "none",
    "moe_router_bias_update_rate": 0.0,
}


@dataclass(frozen=True)
class Dialect:
    version: Version
    config_name: str | None  # --config-name, when the engine is chosen by config file
    engine_override: str | None
    grad_offload: bool


def installed_verl() -> Version | None:
    try:
        return Version(version("verl"))
    except PackageNotFoundError:
        return None


def dialect(verl_version: Version) -> Dialect:
    modern = verl_version >= Version("0.8")
    return Dialect(
        version=verl_version,
        config_name=None if modern else "ppo_megatron_trainer",
        engine_override="model_engine=megatron" if modern else None,
        grad_offload=verl_version < Version("0.9.1"),
    )


@dataclass(frozen=True)
class Requirement:
    """A setting this machine's stack needs, and why: a key of the Megatron transformer config (set for
    actor and ref alike: each builds its own model from its own override_transformer_config) or a node
    environment variable."""

    key: str  # override_transformer_config key, or variable name
    value: str
    reason: str
    kind: str = "transformer"  # or "environment"

    @property
    def setting(self) -> str:
        return f"{self.key}={self.value}" if self.kind == "environment" else f"override_transformer_config.{self.key}={self.value}"


def importable(module: str) -> bool:
    """Whether this Python finds `module` (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def stack_requirements(found: Callable[[str], bool] = importable) -> list[Requirement]:
    """What verl 0.9.1 + Megatron-Bridge + vLLM need on a machine without flash-attn, apex or flashinfer.

    Read in their code and met on the GPU run (bench/RESULTS.md): verl's default attention backend is
    `flash`, which Transformer Engine serves only through the flash-attn package; Megatron-Bridge's
    DeepSeek-V3 provider turns gradient_accumulation_fusion on, and megatron-core's output layer then
    needs apex's fused_weight_gradient_mlp_cuda (the run's ref model died on it when only the actor had
    the override); vLLM's sampler uses flashinfer unless told not to."""
    needs = []
    if not found("flash_attn"):
        needs.append(Requirement("attention_backend", "fused",
                                 "flash-attn is not installed: verl's default attention_backend=flash has no Transformer Engine "
                                 "backend; fused (cuDNN) serves MLA's head sizes"))
    if not found("fused_weight_gradient_mlp_cuda"):
        needs.append(Requirement("gradient_accumulation_fusion", "False",
                                 "apex is not installed: Megatron-Bridge's DeepSeek-V3 provider sets gradient_accumulation_fusion=True, "
                                 "and megatron-core's output layer then asks for apex's fused_weight_gradient_mlp_cuda"))
    if not found("flashinfer"):
        needs.append(Requirement("VLLM_USE_FLASHINFER_SAMPLER", "0",
                                 "flashinfer is not installed: vLLM's sampler would import it", kind="environment"))
    return needs


@dataclass(frozen=True)
class RunSettings:
    """Saving, resuming and scoring of one run (the `launch grpo` flags), as verl overrides."""

    ckpt_dir: Path | None = None
    save_every: int = 0  # 0: never save
    keep: int | None = None
    resume: str = "auto"  # auto, never, or a global_step_N dir
    reward_path: Path | None = None
    reward_name: str = "compute_score"
    test_every: int = 10
    requirements: list[Requirement] = field(default_factory=list)

    def overrides(self) -> list[str]:
        out = [f"trainer.save_freq={self.save_every if self.save_every > 0 else -1}", f"trainer.test_freq={self.test_every}"]
        if self.ckpt_dir is not None:
            out.append(f"trainer.default_local_dir={self.ckpt_dir}")
        if self.keep is not None:
            out.append(f"trainer.max_actor_ckpt_to_keep={self.keep}")
        if self.resume == "auto":
            out.append("trainer.resume_mode=auto")
        elif self.resume == "never":
            out.append("trainer.resume_mode=disable")
        else:
            out += ["trainer.resume_mode=resume_path", f"trainer.resume_from_path={self.resume}"]
        if self.reward_path is not None:
            out += [f"reward.custom_reward_function.path={self.reward_path}", f"reward.custom_reward_function.name={self.reward_name}"]
        return out + [f"++actor_rollout_ref.{role}.megatron.{need.setting}" for role in ROLES
                      for need in self.requirements if need.kind == "transformer"]

    @property
    def environment(self) -> dict[str, str]:
        """The node environment variables the stack needs."""
        return {need.key: need.value for need in self.requirements if need.kind == "environment"}


def _bool(value: bool) -> str:
    return "True" if value else "False"


def build_overrides(
    plan: Plan,
    model: Path,
    mcore_ckpt: Path,
    data: Path,
    verl_dialect: Dialect,
    extra: list[str] = (),
    train_batch_size: int | None = None,
    run: RunSettings | None = None,
) -> list[str]:
    """Every override the GRPO run needs; `extra` (from --set) goes last and wins."""
    run = run or RunSettings()
    overrides = [verl_dialect.engine_override] if verl_dialect.engine_override else []
    batch = train_batch_size or max(plan.dp, 1) * 8
    overrides += [
        "algorithm.adv_estimator=grpo",
        "algorithm.use_kl_in_reward=False",
        f"data.train_files={data / 'train.parquet'}",
        f"data.val_files={data / 'test.parquet'}",
        f"data.train_batch_size={batch}",
        "data.max_prompt_length=1024",
        "data.max_response_length=2048",
        f"actor_rollout_ref.model.path={model}",
        f"actor_rollout_ref.actor.optim.lr={plan.extra.get('lr', 1e-6)}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={batch}",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
        "actor_rollout_ref.actor.use_kl_loss=True",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=1",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1",
        "actor_rollout_ref.rollout.name=vllm",
        f"actor_rollout_ref.rollout.tensor_model_parallel_size={plan.rollout_tp}",
        f"actor_rollout_ref.rollout.gpu_memory_utilization={plan.gpu_memory_utilization}",
        f"actor_rollout_ref.rollout.n={plan.extra.get('rollout_n', 8)}",
        f"trainer.nnodes={plan.nodes}",
        f"trainer.n_gpus_per_node={plan.gpus_per_node}",
        "trainer.logger=['console']",
        "trainer.total_epochs=1",
    ]
    for role in ROLES:  # the ref does not inherit the dist-checkpoint keys from the actor
        prefix = f"actor_rollout_ref.{role}.megatron"
        overrides += [
            f"{prefix}.tensor_model_parallel_size={plan.tp}",
            f"{prefix}.pipeline_model_parallel_size={plan.pp}",
            f"{prefix}.expert_model_parallel_size={plan.ep}",
            f"{prefix}.expert_tensor_parallel_size={plan.etp}",
            f"{prefix}.context_parallel_size={plan.cp}",
            f"{prefix}.param_offload={_bool(plan.param_offload)}",
            f"{prefix}.use_dist_checkpointing=True",
            f"{prefix}.dist_checkpointing_path={mcore_ckpt}",
        ]
        transformer = f"++{prefix}.override_transformer_config"
        if plan.first_stage_layers is not None:
            overrides.append(f"{transformer}.num_layers_in_first_pipeline_stage={plan.first_stage_layers}")
        if plan.last_stage_layers is not None:
            overrides.append(f"{transformer}.num_layers_in_last_pipeline_stage={plan.last_stage_layers}")
        overrides += [f"{transformer}.{key}={value}" for key, value in ROUTER_STABILITY.items()]
    actor = "actor_rollout_ref.actor.megatron"
    overrides.append(f"{actor}.optimizer_offload={_bool(plan.optimizer_offload)}")
    if verl_dialect.grad_offload:
        overrides.append(f"{actor}.grad_offload={_bool(plan.grad_offload)}")
    overrides += [
        f"++{actor}.override_transformer_config.recompute_granularity=full",
        f"++{actor}.override_transformer_config.recompute_method=uniform",
        f"++{actor}.override_transformer_config.recompute_num_layers=1",
    ]
    if plan.optimizer_offload_fraction is not None:
        optim = "actor_rollout_ref.actor.optim.override_optimizer_config"
        overrides += [f"++{optim}.optimizer_offload_fraction={plan.optimizer_offload_fraction}", f"++{optim}.optimizer_cpu_offload=True"]
    return overrides + run.overrides() + list(extra)


def command_line(verl_dialect: Dialect, overrides: list[str], python: str = sys.executable) -> list[str]:
    head = [python, *ENTRYPOINT]
    if verl_dialect.config_name:
        head += ["--config-name", verl_dialect.config_name]
    return head + overrides


CHECK_SCRIPT = r"""
import json, sys
from pathlib import Path
from hydra import compose, initialize_config_dir
import verl
config_dir = str(Path(verl.__file__).parent / "trainer" / "config")
name, overrides = sys.argv[1], json.loads(sys.argv[2])
try:
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        config = compose(config_name=name, overrides=overrides)
    from verl.utils.config import validate_config
    try:
        from verl.trainer.main_ppo import need_critic, need_reference_policy
        use_ref, use_critic = need_reference_policy(config), need_critic(config)
    except ImportError:
        use_ref, use_critic = True, False
    validate_config(config=config, use_reference_policy=use_ref, use_critic=use_critic)
    from omegaconf import OmegaConf
    print(json.dumps({"ok": True, "config": OmegaConf.to_container(config, resolve=False)}))
except Exception as exc:
    print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}))
"""


def validate_with_verl(verl_dialect: Dialect, overrides: list[str], python: str = sys.executable) -> dict:
    """Compose verl's own config with the overrides and run verl's validation, in a fresh process."""
    name = verl_dialect.config_name or "ppo_trainer"
    result = subprocess.run([python, "-c", CHECK_SCRIPT, name, json.dumps(overrides)], capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"ok": False, "error": (result.stderr or result.stdout)[-2000:]}
    return json.loads(lines[-1])
