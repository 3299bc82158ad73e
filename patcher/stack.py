"""Which Megatron patch a training stack needs, and which would hurt it.

The exporter that sends Megatron weights to vLLM decides what the MLA down projections must look like
(sources read 2026-11-30; REFERENCE.md section 4):
  megatron-bridge  verl 0.9.1's default (use_mbridge=True, vanilla_mbridge=False): exports a duplicated
                   TELinear as replicated and gathers a column-parallel one. Needs no patch.
  flag-gather      verl's own per-tensor generator (verl <= 0.6, use_mbridge=False; Pai's recipe) and
                   mbridge <= 0.15.1: gathers by `tensor_model_parallel`. Duplicated TELinear of 0.14-0.16
                   needs the export flag, or vLLM gets TP stacked copies.
  rank0-copy       mbridge built from main after 2025-12 (vanilla_mbridge=True with mbridge > 0.15.1):
                   takes rank 0's copy of the down projections, so a column-parallel layout exports one
                   TP shard.
And training: a column-parallel layout (0.12/0.13, or the seed edit) without the rope-gradient fix
gives wrong gradients at TP > 1 (Megatron-LM #1699).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from packaging.version import InvalidVersion, Version

from patcher.states import (
    APPLIED,
    EXPORT_FLAG,
    NEEDED,
    NOT_NEEDED,
    Q_PROJ_NORM,
    ROPE_GRADIENT,
    SEED_EDIT,
    UNSUPPORTED,
    UPSTREAM,
    Status,
)

MEGATRON_BRIDGE = "megatron-bridge"
FLAG_GATHER = "flag-gather"
RANK0_COPY = "rank0-copy"
LAST_FLAG_GATHER_MBRIDGE = Version("0.15.1")
FIRST_BRIDGE_VERL = Version("0.7")  # verl releases before this export with their own per-tensor generator


@dataclass
class Stack:
    """Versions and verl's Megatron engine settings (None: not installed / not known)."""

    megatron_core: str | None = None
    verl: str | None = None
    use_mbridge: bool | None = None
    vanilla_mbridge: bool | None = None
    mbridge: str | None = None
    megatron_bridge: str | None = None


@dataclass
class Advice:
    """What this stack needs from the tree, what is harmful in it now, and why."""

    exporter: str | None
    layout: str | None
    needed: list[str] = field(default_factory=list)
    harmful: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _installed(*names: str) -> str | None:
    for name in names:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def engine_settings(config: dict[str, Any] | None) -> tuple[bool | None, bool | None]:
    """(use_mbridge, vanilla_mbridge) of the actor from a composed verl config."""
    if not config:
        return None, None
    megatron = (((config.get("actor_rollout_ref") or {}).get("actor") or {}).get("megatron")) or {}
    return megatron.get("use_mbridge"), megatron.get("vanilla_mbridge")


def installed_stack(megatron_core: str | None, config: dict[str, Any] | None = None) -> Stack:
    """The installed verl / mbridge / Megatron-Bridge, and the engine settings of `config` if given."""
    use_mbridge, vanilla = engine_settings(config)
    return Stack(
        megatron_core=megatron_core,
        verl=_installed("verl"),
        use_mbridge=use_mbridge,
        vanilla_mbridge=vanilla,
        mbridge=_installed("mbridge"),
        megatron_bridge=_installed("megatron-bridge", "megatron_bridge"),
    )


def _version(text: str | None) -> Version | None:
    try:
        return Version(text) if text else None
    except InvalidVersion:
        return None


def exporter(stack: Stack) -> str | None:
    """How weights reach vLLM in this stack (None: verl is not installed)."""
    verl = _version(stack.verl)
    if verl is None:
        return None
    if verl < FIRST_BRIDGE_VERL or stack.use_mbridge is False:
        return FLAG_GATHER
    if stack.vanilla_mbridge:
        mbridge = _version(stack.mbridge)
        return FLAG_GATHER if mbridge is not None and mbridge <= LAST_FLAG_GATHER_MBRIDGE else RANK0_COPY
    return MEGATRON_BRIDGE


def advise(stack: Stack, patch_states: list[dict[str, Any]], tp: int | None = None, q_lora: bool | None = None) -> Advice:
    """Needed and harmful patches of a tree (its `patch_states`) under this stack, for a model with a query LoRA
    (`q_lora` True: DeepSeek-V3, Kimi-K2), without one (False: V2-Lite, Moonlight) or not known (None)."""
    states = {state["name"]: state["state"] for state in patch_states}
    spec, flag, rope = states.get(SEED_EDIT), states.get(EXPORT_FLAG), states.get(ROPE_GRADIENT)
    column = spec in (APPLIED, NOT_NEEDED)
    advice = Advice(exporter(stack), "column-parallel" if column else "duplicated" if spec else None)
    rope_in = rope in (APPLIED, UPSTREAM)
    if column and not rope_in:
        advice.harmful.append(f"{SEED_EDIT if spec == APPLIED else 'column-parallel release'} without {ROPE_GRADIENT}")
        advice.needed.append(ROPE_GRADIENT)
        advice.reasons.append(
            "column-parallel down projections without the rope-gradient fix: TP > 1 gradients of the q/kv down "
            "projections and every earlier layer differ from TP = 1 (Megatron-LM #1699); run `patcher apply`"
        )
    if column and advice.exporter == RANK0_COPY:
        advice.harmful.append(f"{SEED_EDIT} under mbridge > {LAST_FLAG_GATHER_MBRIDGE}")
        advice.reasons.append(
            f"mbridge {stack.mbridge or '(main)'} (vanilla_mbridge=True) exports rank 0's copy of the down projections: "
            "a column-parallel layout sends vLLM one TP shard; `patcher revert` the seed edit, or use Megatron-Bridge"
        )
    if not column and flag == NEEDED:
        if advice.exporter in (FLAG_GATHER, None):
            advice.needed.append(EXPORT_FLAG)
            who = "this stack's exporter" if advice.exporter else "an exporter that gathers by the flag (verl <= 0.6, mbridge <= 0.15.1)"
            advice.reasons.append(
                f"duplicated TELinear weights are flagged tensor_model_parallel=True: {who} sends vLLM TP stacked "
                "copies of q_a_proj / kv_a_proj_with_mqa; run `patcher apply` (the export-flag backport)"
            )
        else:
            advice.reasons.append(
                f"{advice.exporter} exports duplicated TELinear weights as replicated: the export flag is not needed "
                "(harmless; `patcher apply` adds it)"
            )
    q_proj_needed = states.get(Q_PROJ_NORM) == NEEDED and not q_lora
    if not advice.reasons and not q_proj_needed and advice.exporter is not None:
        advice.reasons.append(f"nothing to change: {advice.layout} down projections are exported and trained correctly by {advice.exporter}")
    if tp is not None and tp <= 1:
        advice.needed = []
        advice.harmful = []
        advice.reasons = [f"TP={tp}: the down projections are not split, so no down-projection patch matters"]
    if q_proj_needed:  # any exporter, any TP: the model itself differs
        advice.needed.append(Q_PROJ_NORM)
        advice.reasons.append(
            "megatron-core 0.19+ fuses an RMSNorm into linear_q_proj when q_lora_rank is null (DeepSeek-V2-Lite, Moonlight); "
            "HF checkpoints have no weight for it: run `patcher apply` (the q-proj-norm patch; harmless with a query LoRA)"
        )
    return advice


def tree_advice(status: Status, config: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The installed stack (verl's default engine settings unless `config`) and what it needs from the tree."""
    if status.target != "megatron" or status.state == UNSUPPORTED:
        return None
    stack = installed_stack(status.version, config)
    return {"stack": asdict(stack), **advise(stack, status.patches).to_json()}
