"""patcher end to end: the installed megatron-core (a copy), HF config dirs, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from converters.testing import deepseek_v3_config
from patcher.cli import main
from patcher.targets import installed_megatron_spec

SPEC = Path("megatron/core/models/gpt/gpt_layer_specs.py")
TE = Path("megatron/core/extensions/transformer_engine.py")
MLA = Path("megatron/core/transformer/multi_latent_attention.py")


@pytest.fixture(scope="module")
def installed_copy(tmp_path_factory) -> Path:
    """A scratch site-packages holding a copy of the installed megatron package."""
    site = tmp_path_factory.mktemp("site")
    shutil.copytree(installed_megatron_spec().parents[3], site / "megatron", ignore=shutil.ignore_patterns("__pycache__"))
    return site


def run(*args: str) -> tuple[int, str, str]:
    result = subprocess.run([sys.executable, "-m", "patcher.cli", *args], capture_output=True, text=True)
    return result.returncode, result.stdout, result.stderr


@pytest.fixture
def megatron_tree(installed_copy, tmp_path) -> Path:
    """A Megatron-LM-checkout-like tree with the installed release's patched files and package_info."""
    root = tmp_path / "Megatron-LM"
    for relative in (SPEC, TE, MLA, Path("megatron/core/package_info.py")):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(installed_copy / relative, root / relative)
    return root


def test_status_of_installed_release_needs_patch():
    import megatron.core.package_info as info

    code, out, _ = run("status", "--json")
    status = json.loads(out)
    assert status["version"] == info.__version__
    assert code == status["exit_code"] == {"needs-patch": 1, "not-needed": 0}[status["state"]]


def test_apply_dry_run_idempotence_and_exact_revert(megatron_tree):
    """The installed 0.16.1 needs the export flag by default; nothing else is touched."""
    te = megatron_tree / TE
    untouched = {path: (megatron_tree / path).read_bytes() for path in (SPEC, MLA)}
    original = te.read_bytes()
    os.chmod(te, 0o640)

    code, out, _ = run("apply", "--dry-run", str(megatron_tree))
    assert code == 0 and "dry run" in out and "export-flag" in out
    added = [line[1:].strip() for line in out.splitlines() if line.startswith("+") and not line.startswith("+++")]
    assert not [line for line in out.splitlines() if line.startswith("-") and not line.startswith("---")]
    assert [line for line in added if not line.startswith("#")] == ['setattr(param, "tensor_model_parallel", False)']
    assert te.read_bytes() == original and not (te.parent / "transformer_engine.py.orig").exists()

    code, out, _ = run("apply", str(megatron_tree))
    assert code == 0 and "patched" in out
    patched = te.read_bytes()
    assert patched != original
    assert stat.S_IMODE(te.stat().st_mode) == 0o640
    assert (te.parent / "transformer_engine.py.orig").read_bytes() == original
    assert {path: (megatron_tree / path).read_bytes() for path in (SPEC, MLA)} == untouched
    assert run("status", str(megatron_tree))[0] == 0

    code, out, _ = run("apply", str(megatron_tree))
    assert code == 0 and "nothing to do" in out
    assert te.read_bytes() == patched

    code, out, _ = run("revert", str(megatron_tree))
    assert code == 0
    assert te.read_bytes() == original
    assert stat.S_IMODE(te.stat().st_mode) == 0o640
    assert not (te.parent / "transformer_engine.py.orig").exists()
    assert run("status", str(megatron_tree))[0] == 1


def test_every_path_form_resolves_to_the_tree(megatron_tree):
    forms = [megatron_tree, megatron_tree / "megatron", megatron_tree / "megatron/core", megatron_tree / SPEC, megatron_tree / TE, megatron_tree / MLA]
    paths = {json.loads(run("status", "--json", str(form))[1])["path"] for form in forms}
    assert {Path(p).resolve() for p in paths} == {(megatron_tree / "megatron").resolve()}


def test_patched_copy_still_imports(installed_copy, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(installed_copy, site, ignore=shutil.ignore_patterns("__pycache__"))
    assert run("apply", "--seed-edit", str(site))[0] == 0
    probe = (
        "import megatron.core.models.gpt.gpt_layer_specs as s, pathlib;"
        "print(pathlib.Path(s.__file__).resolve());"
        "spec = s.get_gpt_layer_local_spec(num_experts=None, moe_grouped_gemm=False, multi_latent_attention=True);"
        "print(spec.submodules.self_attention.submodules.linear_q_down_proj.__name__);"
        "import megatron.core.transformer.multi_latent_attention as mla;"
        "print(mla.copy_to_tensor_model_parallel_region.__module__)"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split()
    assert Path(lines[0]).is_relative_to(site.resolve())
    assert lines[1] == "ColumnParallelLinear"
    assert lines[2] == "megatron.core.tensor_parallel.mappings"


def test_revert_refuses_a_file_changed_since_patching(megatron_tree):
    spec = megatron_tree / SPEC
    assert run("apply", "--seed-edit", str(megatron_tree))[0] == 0
    spec.write_text(spec.read_text() + "\n# edited by hand\n")
    edited = spec.read_bytes()
    code, _, err = run("revert", str(megatron_tree))
    assert code == 2 and "changed since it was patched" in err and "--force" in err
    assert spec.read_bytes() == edited
    assert run("revert", "--force", str(megatron_tree))[0] == 0
    assert "edited by hand" not in spec.read_text()
    assert not list(megatron_tree.rglob("*.orig"))


def write_config(directory: Path, config: dict, indent: int | None = 2) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps(config, indent=indent) + "\n")
    return path


def test_hf_config_apply_keeps_order_and_formatting(tmp_path):
    path = write_config(tmp_path / "model", deepseek_v3_config())
    original = path.read_bytes()
    assert run("status", str(tmp_path / "model"))[0] == 1
    code, out, _ = run("apply", "--dry-run", str(tmp_path / "model"))
    assert code == 0 and '-  "quantization_config": {' in out and '+  "num_nextn_predict_layers": 0,' in out
    assert path.read_bytes() == original

    assert run("apply", str(tmp_path / "model"))[0] == 0
    expected = {k: v for k, v in deepseek_v3_config().items() if k != "quantization_config"}
    expected["num_nextn_predict_layers"] = 0
    assert path.read_text() == json.dumps(expected, indent=2) + "\n"
    assert (tmp_path / "model" / "config.json.orig").read_bytes() == original
    assert run("apply", str(tmp_path / "model"))[1].startswith("nothing to do")
    assert run("status", str(tmp_path / "model"))[0] == 0
    assert run("revert", str(path))[0] == 0
    assert path.read_bytes() == original


def test_hf_config_keep_mtp(tmp_path):
    path = write_config(tmp_path, deepseek_v3_config())
    assert main(["apply", "--keep-mtp", str(tmp_path)]) == 0
    config = json.loads(path.read_text())
    assert config["num_nextn_predict_layers"] == 1 and "quantization_config" not in config


def test_config_without_the_keys_is_not_needed(tmp_path):
    config = {k: v for k, v in deepseek_v3_config().items() if k not in ("quantization_config", "num_nextn_predict_layers")}
    path = write_config(tmp_path, config)
    before = path.read_bytes()
    code, out, _ = run("status", str(tmp_path))
    assert code == 0 and "neither quantization_config nor num_nextn_predict_layers" in out
    assert run("apply", str(tmp_path))[0] == 0
    assert path.read_bytes() == before and not (tmp_path / "config.json.orig").exists()


def test_malformed_config_is_refused_with_position(tmp_path):
    (tmp_path / "config.json").write_text('{\n  "model_type": "deepseek_v3",\n  "num_nextn_predict_layers": 1,,\n}\n')
    before = (tmp_path / "config.json").read_bytes()
    code, _, err = run("apply", str(tmp_path))
    assert code == 2 and "malformed config.json" in err and "line 3" in err
    assert (tmp_path / "config.json").read_bytes() == before
    (tmp_path / "config.json").write_text("[1, 2]\n")
    assert run("status", str(tmp_path))[0] == 2


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("notes.txt", b"just text\n", "not a Python file"),
        ("gpt_layer_specs.py", b"def broken(:\n    pass\n", "not valid Python"),
        ("unrelated.py", b"import os\n\nprint(os.getcwd())\n", "no MLASelfAttentionSubmodules"),
        ("binary.py", bytes(range(256)), "not a UTF-8 text file"),
    ],
)
def test_bad_files_are_refused_and_untouched(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    for command in (["status"], ["apply"], ["apply", "--dry-run"]):
        code, _, err = run(*command, str(path))
        out = err or _
        assert code == 2, (command, out)
        assert message in out and str(path) in out
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_read_only_file_is_refused_before_anything_is_written(megatron_tree):
    te = megatron_tree / TE
    before = {path: (megatron_tree / path).read_bytes() for path in (SPEC, TE, MLA)}
    os.chmod(te, 0o444)
    code, _, err = run("apply", "--seed-edit", str(megatron_tree))
    assert code == 2 and "read-only" in err and str(te) in err and "chmod" in err
    assert {path: (megatron_tree / path).read_bytes() for path in (SPEC, TE, MLA)} == before
    assert not list(megatron_tree.rglob("*.orig"))


def test_missing_and_unknown_paths(tmp_path):
    code, _, err = run("status", str(tmp_path / "nope"))
    assert code == 2 and "no such file" in err
    code, _, err = run("apply", str(tmp_path))
    assert code == 2 and "neither a HF model dir" in err


def test_version_and_help():
    code, out, _ = run("--version")
    assert code == 0 and out.startswith("patcher ")
    code, out, _ = run("apply", "--help")
    assert code == 0 and "--dry-run" in out and "exit codes" in out


def test_fp8_checkpoint_keeps_its_quantization_config(tmp_path):
    """Dropping quantization_config from a checkpoint that still holds FP8 weights would make it unreadable."""
    import torch
    from safetensors.torch import save_file

    model = tmp_path / "model"
    path = write_config(model, deepseek_v3_config())
    save_file(
        {"model.layers.0.mlp.down_proj.weight": torch.zeros(4, 4, dtype=torch.float8_e4m3fn), "model.norm.weight": torch.ones(4)},
        model / "model.safetensors",
    )
    before = sorted((p.name, p.read_bytes()) for p in model.iterdir())
    for command in (["apply"], ["apply", "--dry-run"], ["status"]):
        code, out, err = run(*command, str(model))
        assert code == 2 and "this checkpoint is FP8; run `convert fp8-bf16` first" in err + out
        assert "float8" in err + out
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w_scale_inv": "a.safetensors"}}))
    code, _, err = run("apply", str(model))
    assert code == 2 and "_scale_inv" in err
    (model / "model.safetensors.index.json").unlink()
    assert sorted((p.name, p.read_bytes()) for p in model.iterdir()) == before
    save_file({"model.layers.0.mlp.down_proj.weight": torch.zeros(4, 4, dtype=torch.bfloat16)}, model / "model.safetensors")
    assert run("apply", str(model))[0] == 0  # BF16 weights: the config is patched
    assert "quantization_config" not in json.loads(path.read_text())


def test_revert_restores_a_symlinked_config(tmp_path):
    """HF hub snapshots link config.json into blobs/: apply leaves the blob alone, revert puts the link back."""
    blobs = tmp_path / "blobs"
    blob = write_config(blobs, deepseek_v3_config()).rename(blobs / "0123abcd")
    snapshot = tmp_path / "snapshots" / "main"
    snapshot.mkdir(parents=True)
    link = snapshot / "config.json"
    link.symlink_to(os.path.relpath(blob, snapshot))
    blob_bytes = blob.read_bytes()
    assert run("apply", str(snapshot))[0] == 0
    assert not link.is_symlink() and "quantization_config" not in json.loads(link.read_text())
    assert blob.read_bytes() == blob_bytes
    assert (snapshot / "config.json.orig").is_symlink()
    assert run("revert", str(snapshot))[0] == 0
    assert link.is_symlink() and os.readlink(link) == os.path.relpath(blob, snapshot)
    assert link.read_bytes() == blob_bytes and not os.path.lexists(snapshot / "config.json.orig")


def test_an_fp8_index_without_shards_is_patched(tmp_path):
    """verl with the actor on a dist checkpoint reads only tensor names from the index (the GRPO run on the GPU
    trained from a dir of config, tokenizer and the FP8 release's index): no weights there to misread."""
    model = tmp_path / "model"
    path = write_config(model, deepseek_v3_config())
    index = {"weight_map": {"model.layers.0.mlp.down_proj.weight": "model-00001-of-00002.safetensors",
                            "model.layers.0.mlp.down_proj.weight_scale_inv": "model-00001-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    assert run("apply", str(model))[0] == 0
    config = json.loads(path.read_text())
    assert "quantization_config" not in config and config["num_nextn_predict_layers"] == 0
