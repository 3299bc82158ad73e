"""launch grpo's run settings and preflight checks added for the real run: stack needs, checkpoints and resume,
reward function, group routing, the weight sync's tensor names; the reward and the trainer's lifetime."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.grpo import (
    Preflight,
    _check_hf_index,
    _check_resume_path,
    _check_reward,
    check_checkpoints,
    check_group_routing,
    check_stack_settings,
    human_bytes,
)
from launch.overrides import RunSettings, stack_requirements
from launch.plan import load_model_config
from launch.rewards import DIGIT_SHARE, compute_score, digit_share

DSV3 = load_model_config("deepseek-v3")


def only(preflight: Preflight):
    (check,) = preflight.checks
    return check


def test_stack_requirements_follow_what_is_installed():
    nothing = stack_requirements(found=lambda module: False)
    settings = {need.setting for need in nothing}
    assert "override_transformer_config.attention_backend=fused" in settings
    assert "override_transformer_config.gradient_accumulation_fusion=False" in settings
    assert "VLLM_USE_FLASHINFER_SAMPLER=0" in settings
    assert all(need.reason for need in nothing)
    assert stack_requirements(found=lambda module: True) == []
    only_apex = stack_requirements(found=lambda module: module == "fused_weight_gradient_mlp_cuda")
    assert not any("gradient_accumulation_fusion" in need.key for need in only_apex)


def test_run_settings_become_verl_overrides_for_actor_and_ref():
    needs = stack_requirements(found=lambda module: False)
    run = RunSettings(ckpt_dir=Path("/r/ckpt"), save_every=25, keep=3, reward_path=Path("/x/r.py"), reward_name="score",
                      requirements=needs)
    out = run.overrides()
    assert {"trainer.save_freq=25", "trainer.default_local_dir=/r/ckpt", "trainer.max_actor_ckpt_to_keep=3",
            "trainer.resume_mode=auto", "reward.custom_reward_function.path=/x/r.py",
            "reward.custom_reward_function.name=score"} <= set(out)
    for role in ("actor", "ref"):  # the ref builds its own model: without it, the run on the GPU failed
        assert f"++actor_rollout_ref.{role}.megatron.override_transformer_config.gradient_accumulation_fusion=False" in out
    assert not any(o.startswith("VLLM_") for o in out) and run.environment == {"VLLM_USE_FLASHINFER_SAMPLER": "0"}
    assert "trainer.save_freq=-1" in RunSettings(save_every=0).overrides()
    assert "trainer.resume_mode=disable" in RunSettings(resume="never").overrides()
    assert {"trainer.resume_mode=resume_path", "trainer.resume_from_path=/c/global_step_7"} <= set(RunSettings(resume="/c/global_step_7").overrides())


def test_stack_settings_check_fails_when_a_set_undoes_a_need():
    needs = stack_requirements(found=lambda module: False)
    config = {"actor_rollout_ref": {role: {"megatron": {"override_transformer_config": {
        "attention_backend": "fused", "gradient_accumulation_fusion": False}}} for role in ("actor", "ref")}}
    preflight = Preflight()
    check_stack_settings(preflight, config, {"VLLM_USE_FLASHINFER_SAMPLER": "0"}, needs)
    assert only(preflight).ok and "flash-attn is not installed" in only(preflight).message
    for role, key, value in (("actor", "attention_backend", "flash"), ("ref", "gradient_accumulation_fusion", True)):
        broken = json.loads(json.dumps(config))
        broken["actor_rollout_ref"][role]["megatron"]["override_transformer_config"][key] = value
        preflight = Preflight()
        check_stack_settings(preflight, broken, {"VLLM_USE_FLASHINFER_SAMPLER": "0"}, needs)
        assert not only(preflight).ok and key in only(preflight).message, role
    preflight = Preflight()
    check_stack_settings(preflight, config, {}, needs)
    assert not only(preflight).ok and "VLLM_USE_FLASHINFER_SAMPLER=0" in only(preflight).message


def test_checkpoint_estimate_against_free_space(tmp_path):
    run = RunSettings(ckpt_dir=tmp_path / "not" / "yet", save_every=20, keep=2)
    preflight = Preflight()
    check_checkpoints(preflight, DSV3, run)  # 671B parameters x 14 bytes: no test machine has 9.4 TB free
    check = only(preflight)
    assert not check.ok and "9.39 TB" in check.message and "671B parameters" in check.message and "not enough space" in check.message
    tiny = {**DSV3, "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
            "n_routed_experts": 4, "vocab_size": 256, "num_attention_heads": 2, "q_lora_rank": 32, "kv_lora_rank": 32,
            "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16, "first_k_dense_replace": 1}
    preflight = Preflight()
    check_checkpoints(preflight, tiny, run)
    assert only(preflight).ok and "MB" in only(preflight).message and "111K parameters" in only(preflight).message and "keeping the last 2" in only(preflight).message
    (run.ckpt_dir).mkdir(parents=True)
    (run.ckpt_dir / "latest_checkpointed_iteration.txt").write_text("40")
    preflight = Preflight()
    check_checkpoints(preflight, tiny, run)
    assert "resumes from global_step_40" in only(preflight).message
    preflight = Preflight()
    check_checkpoints(preflight, DSV3, RunSettings(save_every=0))
    assert only(preflight).ok and "saves nothing" in only(preflight).message


def test_resume_path_and_reward_function_checks(tmp_path):
    preflight = Preflight()
    _check_resume_path(preflight, RunSettings(resume=str(tmp_path)))
    assert not only(preflight).ok and "global_step_N" in only(preflight).message
    (tmp_path / "global_step_5" / "actor").mkdir(parents=True)
    preflight = Preflight()
    _check_resume_path(preflight, RunSettings(resume=str(tmp_path / "global_step_5")))
    assert only(preflight).ok
    reward = tmp_path / "reward.py"
    reward.write_text("def other(data_source, solution_str, ground_truth, extra_info=None):\n    return 0.0\n")
    preflight = Preflight()
    _check_reward(preflight, RunSettings(reward_path=reward))
    assert not only(preflight).ok and "compute_score not defined (has other)" in only(preflight).message
    preflight = Preflight()
    _check_reward(preflight, RunSettings(reward_path=reward, reward_name="other"))
    assert only(preflight).ok


def test_group_routing_check_names_the_mismatch():
    from converters.testing import deepseek_v3_config

    release = deepseek_v3_config()
    preflight = Preflight()
    check_group_routing(preflight, release)  # top-8 from 4 of 8 groups: 8 = 2 x 4
    assert only(preflight).ok
    preflight = Preflight()
    check_group_routing(preflight, {**release, "num_experts_per_tok": 2, "topk_group": 2, "n_group": 4})
    assert not only(preflight).ok and "top 1 expert(s)" in only(preflight).message
    preflight = Preflight()
    check_group_routing(preflight, {**release, "n_group": 1})
    assert preflight.checks == []


@pytest.mark.parametrize("name", ["kimi-k2", "moonlight-16b-a3b", "deepseek-v2-lite"])
def test_group_routing_check_passes_when_groups_exclude_nothing(name):
    config = load_model_config(name)  # one group, top-k 8 or 6 of 1: 8 != 2 x 1, but no group can be dropped
    assert config["n_group"] == config["topk_group"] == 1 and config["num_experts_per_tok"] != 2 * config["topk_group"]
    preflight = Preflight()
    check_group_routing(preflight, config)
    assert preflight.checks == []
    # all groups kept: top-4 from 4 of 4 groups is plain top-k, whatever score ranks the groups
    preflight = Preflight()
    check_group_routing(preflight, {**DSV3, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 4})
    assert preflight.checks == []
    preflight = Preflight()
    check_group_routing(preflight, {**DSV3, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 3})  # drops one group
    assert not only(preflight).ok


def test_the_weight_sync_needs_every_name_in_the_index(tmp_path):
    from converters.testing import TINY_DEEPSEEK_V3, deepseek_v3_config

    config = {**deepseek_v3_config(), **TINY_DEEPSEEK_V3, "num_nextn_predict_layers": 0}
    from converters.mcore.params import hf_tensor_shapes

    names = sorted(hf_tensor_shapes(config, 0))
    preflight = Preflight()
    _check_hf_index(preflight, tmp_path, config, from_dist_ckpt=True)
    assert not only(preflight).ok and "copy the release's index" in only(preflight).message
    weight_map = {name: "model-00001-of-00001.safetensors" for name in names[1:]}
    weight_map.update({name + "_scale_inv": "model-00001-of-00001.safetensors" for name in names if name.endswith("proj.weight")})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    preflight = Preflight()
    _check_hf_index(preflight, tmp_path, config, from_dist_ckpt=True)
    assert not only(preflight).ok and names[0] in only(preflight).message and "dummy weights" in only(preflight).message
    weight_map[names[0]] = "model-00001-of-00001.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    preflight = Preflight()
    _check_hf_index(preflight, tmp_path, config, from_dist_ckpt=True)
    assert only(preflight).ok and "shards are not read" in only(preflight).message
    preflight = Preflight()
    _check_hf_index(preflight, tmp_path, config, from_dist_ckpt=False)  # Megatron-Bridge would read the weights
    assert not only(preflight).ok and "no safetensors shards" in only(preflight).message


def test_human_bytes():
    assert (human_bytes(9.39e12), human_bytes(77.6e6), human_bytes(512)) == ("9.39 TB", "77.6 MB", "512 B")


def test_digit_share_reward_and_the_default_scorer():
    assert digit_share("") == 0.0 and digit_share("ab 12") == 0.5 and digit_share(" 007 ") == 1.0
    assert compute_score(DIGIT_SHARE, "x1", "") == 0.5
    # every other data source goes to verl's own scorers (MATH-lighteval: last boxed answer)
    pytest.importorskip("verl")
    assert compute_score("DigitalLearningGmbH/MATH-lighteval", "so \\boxed{3}", "3") == 1.0
    assert compute_score("DigitalLearningGmbH/MATH-lighteval", "so \\boxed{4}", "3") == 0.0


def test_sigterm_to_the_launcher_stops_the_trainer(tmp_path):
    """The run on the GPU machine showed it: the launcher must not leave verl running when it is stopped."""
    log = tmp_path / "train.log"
    child = "import os, time; print(os.getpid(), flush=True); time.sleep(120)"
    launcher = (f"from pathlib import Path; from launch.cluster import run_tee, stop_on_sigterm; stop_on_sigterm()\n"
                f"try:\n    run_tee([{sys.executable!r}, '-c', {child!r}], Path({str(log)!r}), {{}})\n"
                f"except KeyboardInterrupt:\n    raise SystemExit(130)\n")
    process = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (log.exists() and log.read_text().strip()) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    assert process.poll() is None, process.stderr.read()
    trainer = int(log.read_text().split()[0])
    os.kill(process.pid, signal.SIGTERM)
    assert process.wait(timeout=60) == 130
    with pytest.raises(ProcessLookupError):
        for _ in range(100):
            os.kill(trainer, 0)
            time.sleep(0.1)
