"""Guards from the real GRPO run (tests/data/grpo_run, captured on the lent H100 on 2026-12-05 with verl 0.9.1,
vLLM 0.24.0, megatron-core 0.18.0, Megatron-Bridge 0.5.1, TE 2.20.2): the argv verl ran with, and the layout
verl saved. Inputs are regenerated here by our own code with the run's model settings."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from convert_cli import convert

DATA = Path(__file__).resolve().parents[1] / "data" / "grpo_run"
REPO = Path(__file__).resolve().parents[2]
RUN = json.loads((DATA / "run.json").read_text())

pytest.importorskip("verl")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The run's work dir, rebuilt as bench/grpo_device.sh's setup phase builds it (FP8 model, data, ckpt, model dir)."""
    from converters.testing import digit_task_rows, make_servable_fp8_checkpoint, math_sample_rows

    work = tmp_path_factory.mktemp("grpo")
    config = make_servable_fp8_checkpoint(work / "fp8", overrides=RUN["model_overrides"])
    for split, count, seed in (("train", 512, 0), ("test", 16, 1)):
        (work / "task").mkdir(exist_ok=True)
        (work / "task" / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in digit_task_rows(count, seed)))
    rows = math_sample_rows()
    (work / "math").mkdir()
    (work / "math" / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows["train"] + rows["test"]))
    for args in (("prompts", "--src", "task", "--dst", "data/task", "--data-source", "dsv3-toolkit/digit-share"),
                 ("math-lighteval", "--src", "math", "--dst", "data/math")):
        result = subprocess.run([sys.executable, "-m", "converters.cli", *args], cwd=work, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    for dst, extra in (("ckpt", ()), ("ckpt-nomtp", ("--drop-mtp",))):  # as the run had it; as verl's model holds it
        result = convert("hf-mcore", "--src", str(work / "fp8"), "--dst", str(work / dst), *extra)
        assert result.returncode == 0, result.stderr
    (work / "model").mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "model.safetensors.index.json"):
        shutil.copy(work / "fp8" / name, work / "model" / name)
    result = subprocess.run([sys.executable, "-m", "patcher.cli", "apply", str(work / "model")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return work, config


def localise(text: str, work: Path) -> str:
    return text.replace(RUN["repo_dir"], str(REPO)).replace(RUN["work_dir"], str(work))


def test_launch_grpo_still_composes_the_command_verl_ran(work):
    """`launch grpo` with the run's flags on the same inputs gives verl the argv it ran with on the GPU."""
    work, _ = work
    flags = [localise(flag, work) for flag in RUN["launch_grpo"]]
    result = subprocess.run([sys.executable, "-m", "launch.cli", "grpo", *flags, "--dry-run", "--json"], cwd=work,
                            capture_output=True, text=True)
    report = json.loads(result.stdout)
    # the run's tiny model took top-2 of 2 groups; the routing check written after that run (from its logits
    # finding) refuses exactly that, and nothing else
    assert [check["name"] for check in report["preflight"] if not check["ok"]] == ["MoE group routing"]
    captured = [localise(arg, work) for arg in json.loads((DATA / "command.json").read_text())]
    assert captured[-1].startswith("hydra.run.dir=")  # added when it runs, not part of the dry run
    assert report["command"][1:] == captured[1:-1]
    assert report["environment"]["VLLM_USE_FLASHINFER_SAMPLER"] == "0"


def test_our_checkpoint_holds_exactly_what_verl_saved_of_the_model(work):
    """hf-mcore (TE spec, MTP left out as the patched config.json has it) writes the keys, global shapes and dtypes
    that verl's Megatron actor saved in global_step_N/actor/model/dist_ckpt: the model verl builds asks for no
    more and no less."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    work, _ = work
    metadata = FileSystemReader(str(work / "ckpt-nomtp" / "release")).read_metadata().state_dict_metadata
    ours = {key: [list(meta.size), str(meta.properties.dtype).removeprefix("torch.")] if isinstance(meta, TensorStorageMetadata) else "object"
            for key, meta in metadata.items()}
    saved = json.loads((DATA / "saved_layout.json").read_text())["dist_checkpoints"]["actor/model/dist_ckpt"]
    assert ours == saved


def verl_tree(root: Path, model_ckpt: Path) -> Path:
    """verl's checkpoints dir with the captured file layout; the model dist_ckpt holds `model_ckpt`'s files."""
    layout = json.loads((DATA / "saved_layout.json").read_text())
    step = root / layout["step_dir"]
    for name in layout["files"]:
        path = step / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.startswith("actor/model/dist_ckpt/"):
            shutil.copy(model_ckpt / path.name, path)
        else:
            path.write_bytes(b"not read by the export")
    (root / "latest_checkpointed_iteration.txt").write_text(layout["step_dir"].removeprefix("global_step_"))
    return step


@pytest.mark.parametrize("pick", ["checkpoints", "global_step", "actor"])
def test_mcore_hf_exports_verls_saved_layout(work, tmp_path, pick):
    """`convert mcore-hf --src` takes verl's checkpoints dir (latest step by its tracker), a global_step_N dir or
    its actor dir; the export holds the checkpoint's weights bit for bit (here: the FP8 release dequantised)."""
    from safetensors.torch import load_file

    from converters.testing import dequantised, load_checkpoint

    work, config = work
    step = verl_tree(tmp_path / "checkpoints", work / "ckpt-nomtp" / "release")
    src = {"checkpoints": step.parent, "global_step": step, "actor": step / "actor"}[pick]
    from launch.grpo import (
        dist_checkpoint,  # launch grpo --mcore-ckpt finds the same dir (a trained actor as the start)
    )

    assert dist_checkpoint(src)[0] == step / "actor" / "model" / "dist_ckpt"
    result = subprocess.run([sys.executable, "-m", "converters.cli", "mcore-hf", "--src", str(src), "--hf-config", str(work / "model"),
                             "--dst", str(tmp_path / "hf"), "--quiet"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "actor/model/dist_ckpt" in result.stdout
    exported = {}
    for shard in (tmp_path / "hf").glob("*.safetensors"):
        exported.update(load_file(str(shard)))
    reference = {name: tensor for name, tensor in dequantised(load_checkpoint(work / "fp8")).items()
                 if not name.startswith(f"model.layers.{config['num_hidden_layers']}.")}
    assert set(exported) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(exported[name], tensor), name


def test_mcore_hf_names_a_verl_step_that_was_cut_short(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "global_step_20" / "actor").mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text("20")
    result = convert("mcore-hf", "--src", str(root), "--hf-config", str(tmp_path), "--dst", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "names step '20'" in result.stderr and "global_step_20" in result.stderr
