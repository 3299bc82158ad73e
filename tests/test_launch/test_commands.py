"""launch: plans against the known recipes, overrides composed against the installed verl, dry run."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from packaging.version import Version

from converters.testing import deepseek_v3_config
from launch.grpo import cluster_from_env
from launch.overrides import build_overrides, dialect, installed_verl, validate_with_verl
from launch.plan import PlanError, check_rules, load_model_config, make_plan, stage_split
from toolkit.recipes import RECIPES

DSV3 = load_model_config("deepseek-v3")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], capture_output=True, text=True)


def test_recipes_are_reproduced_exactly():
    plan, _ = make_plan("deepseek-v3", 16, 8, 96, "pai-16x8")
    assert (plan.tp, plan.pp, plan.ep, plan.etp, plan.first_stage_layers, plan.last_stage_layers) == (4, 16, 2, 4, 3, 2)
    assert (plan.rollout_tp, plan.vllm_engines, plan.gpu_memory_utilization) == (32, 4, 0.6)
    assert plan.param_offload and plan.grad_offload and plan.optimizer_offload
    assert plan.extra == {"lr": 2e-7, "rollout_n": 2}
    assert (RECIPES["verl-h20-12"].tp, RECIPES["verl-h20-12"].pp, RECIPES["verl-h20-12"].ep, RECIPES["verl-h20-12"].last_stage_layers) == (8, 12, 8, 6)
    sixteen = RECIPES["verl-h20-16"]
    assert (sixteen.tp, sixteen.pp, sixteen.ep, sixteen.etp, sixteen.last_stage_layers, sixteen.optimizer_offload_fraction) == (8, 16, 8, 1, 1, 0.5)
    assert (RECIPES["verl-h20-64"].tp, RECIPES["verl-h20-64"].pp, RECIPES["verl-h20-64"].ep) == (1, 16, 32)
    for name, recipe in RECIPES.items():
        assert check_rules(recipe, load_model_config(recipe.model)) == [], name


def test_divisibility_rules_are_enforced():
    bad = replace(RECIPES["pai-16x8"], first_stage_layers=4)
    assert any("do not split evenly" in p for p in check_rules(bad, DSV3))
    assert any("attention heads" in p for p in check_rules(replace(RECIPES["pai-16x8"], tp=3), DSV3))
    assert stage_split(61, 16) == (None, 1)
    assert stage_split(64, 16) == (None, None)


def test_impossible_request_names_the_smallest_cluster():
    with pytest.raises(PlanError, match="smallest feasible cluster is 8 nodes"):
        make_plan("deepseek-v3", 2, 8, 80)
    result = run("plan", "--model", "deepseek-v3", "--nodes", "2")
    assert result.returncode == 2 and "smallest feasible" in result.stderr


def test_plan_cli_json():
    result = run("plan", "--model", "deepseek-v3", "--nodes", "16", "--recipe", "pai-16x8", "--gpu-mem-gb", "96", "--json")
    report = json.loads(result.stdout)
    assert report["dp"] == 2 and report["memory_gb"]["fits"] and report["moe_layers"] == 58


verl = pytest.importorskip("verl")


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_composes_with_installed_verl(name):
    recipe = RECIPES[name]
    verl_dialect = dialect(installed_verl())
    overrides = build_overrides(recipe, Path("/m"), Path("/c/release"), Path("/d"), verl_dialect, ["trainer.project_name=t"])
    result = validate_with_verl(verl_dialect, overrides)
    assert result["ok"], result["error"]
    config = result["config"]
    for role in ("actor", "ref"):
        megatron = config["actor_rollout_ref"][role]["megatron"]
        assert megatron["tensor_model_parallel_size"] == recipe.tp and megatron["pipeline_model_parallel_size"] == recipe.pp
        assert megatron["expert_model_parallel_size"] == recipe.ep and megatron["dist_checkpointing_path"] == "/c/release"
        assert megatron["override_transformer_config"]["moe_router_dtype"] == "fp32"
    assert config["trainer"]["nnodes"] == recipe.nodes and config["algorithm"]["adv_estimator"] == "grpo"
    assert config["actor_rollout_ref"]["rollout"]["tensor_model_parallel_size"] == recipe.rollout_tp
    assert config["trainer"]["project_name"] == "t"


def test_dialects_and_verl_rejects_wrong_keys():
    assert dialect(Version("0.7.1")).config_name == "ppo_megatron_trainer"
    assert dialect(Version("0.8.0")).engine_override == "model_engine=megatron"
    assert dialect(Version("0.9.0")).grad_offload and not dialect(Version("0.9.1")).grad_offload
    installed = dialect(installed_verl())
    overrides = build_overrides(RECIPES["pai-16x8"], Path("/m"), Path("/c"), Path("/d"), installed, ["actor_rollout_ref.actor.megatron.no_such_key=1"])
    result = validate_with_verl(installed, overrides)
    assert not result["ok"] and "no_such_key" in result["error"]
    bad_batch = build_overrides(RECIPES["pai-16x8"], Path("/m"), Path("/c"), Path("/d"), installed, ["data.train_batch_size=3"])
    result = validate_with_verl(installed, bad_batch)
    assert not result["ok"] and "train_batch_size" in result["error"]


def test_cluster_from_environment():
    assert cluster_from_env({"RANK": "3", "WORLD_SIZE": "16", "MASTER_ADDR": "10.0.0.1"}).node_rank == 3
    mlp = cluster_from_env({"MLP_ROLE_INDEX": "2", "MLP_WORKER_NUM": "4", "MLP_WORKER_0_HOST": "h0"})
    assert (mlp.node_rank, mlp.nodes, mlp.head_address, mlp.source) == (2, 4, "h0", "MLP")
    slurm = cluster_from_env({"SLURM_NODEID": "1", "SLURM_NNODES": "2"})
    assert (slurm.node_rank, slurm.nodes, slurm.source) == (1, 2, "Slurm")
    assert cluster_from_env({"NODE_RANK": "0", "NNODES": "8", "MASTER_ADDR": "a"}).nodes == 8
    assert cluster_from_env({}, nodes=4, node_rank=1, head="127.0.0.1").source == "flags"


def test_grpo_refuses_to_start_when_preflight_fails(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({**DSV3, "quantization_config": {"fmt": "e4m3"}}))
    args = ["grpo", "--nodes", "16", "--recipe", "pai-16x8", "--gpu-mem-gb", "96", "--model", str(tmp_path / "model")]
    result = run(*args, "--mcore-ckpt", str(tmp_path / "none"), "--data", str(tmp_path / "none"))
    assert result.returncode == 1
    assert "preflight failed, nothing started" in result.stderr
    for expected in ("patcher apply", "convert hf-mcore", "convert math-lighteval"):
        assert expected in result.stderr


def test_doctor_reports_versions_and_patch_status():
    import torch

    result = run("doctor", "--json")
    data = json.loads(result.stdout)
    rows = {row["package"]: row for row in data["packages"]}
    assert rows["torch"]["installed"] == torch.__version__ and rows["vllm"]["seed"] == "0.8.5"
    assert data["megatron_patch"]["state"] in ("needs-patch", "applied", "not-needed")
    assert result.returncode == (0 if data["megatron_patch"]["state"] != "needs-patch" else 1)


def megatron_copy(tmp_path: Path, *apply_args: str) -> Path:
    import shutil

    from patcher.cli import main as patcher_main
    from patcher.targets import installed_megatron_root

    site = tmp_path / "site"
    shutil.copytree(installed_megatron_root(), site / "megatron", ignore=shutil.ignore_patterns("__pycache__"))
    if apply_args:
        assert patcher_main(["apply", *apply_args, str(site)]) == 0
    return site


BRIDGE = {"actor_rollout_ref": {"actor": {"megatron": {"use_mbridge": True, "vanilla_mbridge": False}}}}
VANILLA = {"actor_rollout_ref": {"actor": {"megatron": {"use_mbridge": True, "vanilla_mbridge": True}}}}


def megatron_check(site: Path, config: dict, tp: int = 4):
    from launch.grpo import Preflight, check_megatron

    preflight = Preflight()
    check_megatron(preflight, replace(RECIPES["pai-16x8"], tp=tp), config, deepseek_v3_config(), site)
    return preflight.checks[0]


def test_q_proj_norm_is_demanded_only_for_models_without_a_query_lora():
    """megatron-core 0.19's tree needs q-proj-norm (its patch states as `patcher status` gives them for 0.19.2),
    but only a model without a query LoRA is built differently: DeepSeek-V3 passes, Moonlight is told to patch."""
    from patcher.stack import Stack, advise

    states = [{"name": "seed-edit", "state": "on-request"}, {"name": "export-flag", "state": "upstream"},
              {"name": "rope-gradient", "state": "not-needed"}, {"name": "q-proj-norm", "state": "needed"}]
    stack = Stack(megatron_core="0.19.2", verl="0.9.1", use_mbridge=True, vanilla_mbridge=False, megatron_bridge="0.5.1")
    assert advise(stack, states, tp=8, q_lora=True).needed == []
    assert advise(stack, states, tp=8, q_lora=False).needed == ["q-proj-norm"]
    assert advise(stack, states, tp=1, q_lora=False).needed == ["q-proj-norm"]  # the model differs at any TP
    assert advise(stack, states).needed == ["q-proj-norm"]  # model not known (`patcher status`): say so


def test_preflight_demands_no_patch_the_stack_does_not_need(tmp_path):
    """Installed 0.16.1 as released under verl 0.9.1's Megatron-Bridge: nothing to apply at TP=4."""
    check = megatron_check(megatron_copy(tmp_path), BRIDGE)
    assert check.ok, check.message
    assert "megatron-bridge" in check.message and "not needed" in check.message


def test_preflight_fails_on_the_column_edit_without_the_rope_fix(tmp_path):
    site = megatron_copy(tmp_path, "--seed-edit")
    mla = site / "megatron/core/transformer/multi_latent_attention.py"
    mla.write_bytes(mla.with_name(mla.name + ".orig").read_bytes())  # the how-to's edit alone
    check = megatron_check(site, BRIDGE)
    assert not check.ok and "Megatron-LM #1699" in check.message and "patcher apply" in check.message
    assert megatron_check(site, BRIDGE, tp=1).ok  # nothing is split at TP=1


def test_preflight_fails_on_the_column_edit_under_a_rank0_exporter(tmp_path):
    check = megatron_check(megatron_copy(tmp_path, "--seed-edit"), VANILLA)
    assert not check.ok and "rank 0's copy" in check.message
    assert megatron_check(megatron_copy(tmp_path / "b", "--seed-edit"), BRIDGE).ok


def test_preflight_reports_checkpoint_layout_and_read_volume(tmp_path):
    from converters.testing import make_fp8_checkpoint
    from launch.grpo import Preflight, _check_read_volume, dist_checkpoint
    from toolkit.recipes import Plan

    source = tmp_path / "fp8"
    config = make_fp8_checkpoint(source, shards=2)
    plan = Plan(1, 4, 80, tp=2, pp=1, ep=2, etp=2)
    messages = {}
    for name, extra in (("global", []), ("aligned", ["--align-tp", "2"]), ("other", ["--align-tp", "4", "--align-etp", "1"])):
        result = subprocess.run([sys.executable, "-m", "converters.cli", "hf-mcore", "--src", str(source), "--dst", str(tmp_path / name),
                                 "--quiet", *extra], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        preflight = Preflight()
        _check_read_volume(preflight, dist_checkpoint(tmp_path / name)[1], config, plan)
        (check,) = preflight.checks
        assert check.ok and check.name == "checkpoint read volume"
        messages[name] = check.message
    assert "global layout" in messages["global"] and "--align-tp 2 --align-etp 2" in messages["global"]
    assert "aligned to TP2 ETP2, the plan's" in messages["aligned"]
    assert "aligned to TP4 ETP1, the plan has TP2 ETP2" in messages["other"]

    def multiple(message: str) -> float:
        return float(message.split("x what the ranks keep")[0].rsplit(", ", 1)[1])

    # the tiny model's records carry ~1 KB of zip framing each, hence the slack over 1.0
    assert multiple(messages["aligned"]) < 1.15 < 1.5 < multiple(messages["global"])
    assert "MB per node" in messages["aligned"] and "0.00 TB" not in messages["aligned"]  # human units on a tiny model


def test_preflight_names_tensors_the_model_asks_for_and_the_checkpoint_lacks(tmp_path):
    from converters.testing import make_fp8_checkpoint
    from launch.grpo import Preflight, _check_read_volume, dist_checkpoint
    from toolkit.recipes import Plan

    source = tmp_path / "fp8"
    config = make_fp8_checkpoint(source, shards=2)  # keeps its MTP layer in config.json
    result = subprocess.run([sys.executable, "-m", "converters.cli", "hf-mcore", "--src", str(source), "--dst", str(tmp_path / "out"),
                             "--quiet", "--drop-mtp"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    preflight = Preflight()
    _check_read_volume(preflight, dist_checkpoint(tmp_path / "out")[1], config, Plan(1, 2, 80, tp=2, pp=1, ep=1, etp=2))
    (check,) = preflight.checks
    assert not check.ok and "mtp.layers.0." in check.message
    preflight = Preflight()
    _check_read_volume(preflight, dist_checkpoint(tmp_path / "out")[1], {**config, "num_nextn_predict_layers": 0}, Plan(1, 2, 80, tp=2, pp=1, ep=1, etp=2))
    assert preflight.ok
