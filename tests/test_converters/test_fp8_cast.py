"""convert fp8-bf16 on generated DeepSeek-V3 FP8 checkpoints: output, logits, resume, parts, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from convert_cli import convert as run_convert
from faults import assert_gone, fill, spawned_workers, wait_until
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from converters.fp8.cast import run_cast
from converters.fp8.plan import CastOptions, finished_mark_name, plan_cast
from converters.mcore.check import hf_logits
from converters.testing import EXTRA_FILES, dequantised, load_checkpoint, make_fp8_checkpoint
from toolkit.errors import ConvertError

SCALE_ELSEWHERE = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"


@pytest.fixture(scope="module")
def fp8_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fp8") / "DeepSeek-V3-tiny"
    make_fp8_checkpoint(path, shards=4)
    return path


@pytest.fixture(scope="module")
def converted(fp8_model, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("out") / "bf16"
    assert convert("--src", str(fp8_model), "--dst", str(dst), "--verify").returncode == 0
    return dst


def convert(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return run_convert("fp8-bf16", *args, **kwargs)


load_dir = load_checkpoint


def snapshot(path: Path) -> dict[str, bytes]:
    """Every output file's bytes; the finished mark records the source path, which differs by design."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file() and p.name != finished_mark_name("fp8-bf16")}


def test_scale_fixture_layout(fp8_model):
    index = json.loads((fp8_model / "model.safetensors.index.json").read_text())["weight_map"]
    assert index[SCALE_ELSEWHERE] != index[SCALE_ELSEWHERE + "_scale_inv"]
    shapes = {name: t.shape for name, t in load_dir(fp8_model).items()}
    assert shapes[SCALE_ELSEWHERE] == (160, 200)  # ragged like the real 576 rows
    assert any(name.startswith("model.layers.3.") for name in shapes)  # the MTP layer


def test_output_tensors_metadata_index_config_and_files(fp8_model, converted):
    source = load_dir(fp8_model)
    output = load_dir(converted)
    expected = dequantised(source)
    assert set(output) == set(expected)
    for name, tensor in expected.items():
        assert output[name].dtype == tensor.dtype, name
        assert torch.equal(output[name].view(torch.uint8), tensor.contiguous().view(torch.uint8)), name
        if source[name].dtype == torch.float8_e4m3fn:
            assert output[name].dtype == torch.bfloat16
    assert output["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32

    in_index = json.loads((fp8_model / "model.safetensors.index.json").read_text())["weight_map"]
    out_index = json.loads((converted / "model.safetensors.index.json").read_text())
    assert set(out_index["weight_map"]) == set(expected)
    assert all(out_index["weight_map"][name] == in_index[name] for name in expected)  # same shard names
    assert out_index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in output.values())
    for shard in set(out_index["weight_map"].values()):
        with safe_open(str(converted / shard), "pt") as handle:
            assert handle.metadata() == {"format": "pt"}

    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["num_nextn_predict_layers"] == 1
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    for name, text in EXTRA_FILES.items():
        assert (converted / name).read_text() == text
    assert not (converted / ".fp8-bf16").exists()


def test_transformers_logits_equal_the_dequantised_model(fp8_model, converted, tmp_path):
    # The reference: the in-memory dequantised weights, saved by safetensors itself, loaded the same way.
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    save_file(dequantised(load_dir(fp8_model)), str(reference_dir / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(converted / "config.json", reference_dir / "config.json")
    ids = torch.randint(0, 320, (2, 19), generator=torch.Generator().manual_seed(0))
    logits = [hf_logits(path, ids) for path in (converted, reference_dir)]
    assert torch.isfinite(logits[0]).all()
    assert torch.equal(logits[0], logits[1])  # identical weights, identical computation


def test_rerun_on_complete_output_is_a_no_op(fp8_model, converted):
    before = snapshot(converted)
    result = convert("--src", str(fp8_model), "--dst", str(converted), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["shards_converted"] == 0 and summary["finalized"]
    assert snapshot(converted) == before


def test_drop_mtp(fp8_model, tmp_path):
    dst = tmp_path / "no-mtp"
    assert convert("--src", str(fp8_model), "--dst", str(dst), "--drop-mtp").returncode == 0
    names = set(load_dir(dst))
    assert names and not any(name.startswith("model.layers.3.") for name in names)
    assert json.loads((dst / "config.json").read_text())["num_nextn_predict_layers"] == 0
    assert set(json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]) == names


def test_parts_and_workers_give_identical_output(fp8_model, converted, tmp_path):
    reference = snapshot(converted)
    parts = tmp_path / "parts"
    first = convert("--src", str(fp8_model), "--dst", str(parts), "--shard", "0/2")
    assert first.returncode == 1, first.stderr  # waiting for part 1
    assert not (parts / "model.safetensors.index.json").exists()
    assert convert("--src", str(fp8_model), "--dst", str(parts), "--shard", "1/2").returncode == 0
    assert snapshot(parts) == reference

    workers = tmp_path / "workers"
    result = convert("--src", str(fp8_model), "--dst", str(workers), "--workers", "2", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert snapshot(workers) == reference


@pytest.mark.slow
def test_kill_minus_nine_then_resume_is_byte_identical(tmp_path):
    source = tmp_path / "src"
    make_fp8_checkpoint(source, shards=6, overrides={"num_hidden_layers": 6, "n_routed_experts": 16})
    reference = tmp_path / "reference"
    assert convert("--src", str(source), "--dst", str(reference)).returncode == 0

    dst = tmp_path / "killed"
    args = [sys.executable, "-m", "converters.cli", "fp8-bf16", "--quiet", "--src", str(source), "--dst", str(dst)]
    slow = ["--batch-mb", "1", "--max-write-mbps", "4"]
    # a run killed before it wrote its state file left only the state dir and a temp file
    (dst / ".fp8-bf16").mkdir(parents=True)
    (dst / ".fp8-bf16" / ".state.json.abc.tmp").write_text("{")
    for wait_for in ("model-*.tmp", "model-00002-of-00006.safetensors"):  # mid-shard, then between shards
        process = subprocess.Popen([*args, *slow], stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        pattern_dir = dst / ".fp8-bf16" if wait_for.endswith(".tmp") else dst
        while time.time() < deadline and process.poll() is None and not list(pattern_dir.glob(wait_for)):
            time.sleep(0.01)
        assert process.poll() is None, (wait_for, process.returncode, process.stderr.read())
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        assert not (dst / "model.safetensors.index.json").exists()
    resumed = subprocess.run([*args, "--json"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["shards_skipped"] >= 1
    assert snapshot(dst) == snapshot(reference)


def rewrite_shard(model: Path, tensor: str, change) -> Path:
    """Apply `change(state)` to the shard holding `tensor` (in a copy of the model)."""
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shard = model / index["weight_map"][tensor]
    state = load_file(shard)
    change(state)
    save_file(state, str(shard), metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in state or v != shard.name}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    return shard


@pytest.fixture
def broken(fp8_model, tmp_path) -> Path:
    copy = tmp_path / "broken"
    shutil.copytree(fp8_model, copy)
    return copy


def expect_refusal(src: Path, dst: Path, *messages: str, extra: tuple[str, ...] = ()) -> None:
    result = convert("--src", str(src), "--dst", str(dst), *extra)
    assert result.returncode == 2, (result.stdout, result.stderr)
    for message in messages:
        assert message in result.stderr, result.stderr
    if dst.exists():
        assert not (dst / "model.safetensors.index.json").exists()
        assert not list(dst.glob("*.safetensors"))


def test_missing_scale(broken, tmp_path):
    name = "model.layers.1.self_attn.o_proj.weight"
    rewrite_shard(broken, name + "_scale_inv", lambda state: state.pop(name + "_scale_inv"))
    expect_refusal(broken, tmp_path / "out", name, "_scale_inv is in no shard")


def test_scale_of_wrong_shape(broken, tmp_path):
    name = "model.layers.1.self_attn.o_proj.weight"
    rewrite_shard(broken, name + "_scale_inv", lambda state: state.update({name + "_scale_inv": torch.ones(3, 3)}))
    expect_refusal(broken, tmp_path / "out", name + "_scale_inv", "F32[3, 3]", "expected F32[2, 1]")


def test_fp8_tensor_not_2d(broken, tmp_path):
    name = "model.layers.1.self_attn.o_proj.weight"

    def make_3d(state):
        state[name] = state[name].view(torch.uint8).reshape(2, 100, 128).view(torch.float8_e4m3fn)

    rewrite_shard(broken, name, make_3d)
    expect_refusal(broken, tmp_path / "out", name, "only 2-D")


def test_truncated_and_corrupt_shards(broken, tmp_path):
    shard = broken / "model-00002-of-00004.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    expect_refusal(broken, tmp_path / "out", shard.name, "truncated shard")
    shard.write_bytes(data[:8] + b"{not json" + data[17:])
    expect_refusal(broken, tmp_path / "out", shard.name, "not valid JSON")
    shard.unlink()
    expect_refusal(broken, tmp_path / "out", shard.name, "missing")


def test_unsafe_destinations(fp8_model, tmp_path):
    before = snapshot(fp8_model)
    result = convert("--src", str(fp8_model), "--dst", str(fp8_model))
    assert result.returncode == 2 and "is the source directory" in result.stderr
    result = convert("--src", str(fp8_model), "--dst", str(fp8_model / "bf16"))
    assert result.returncode == 2 and "inside the source" in result.stderr
    assert not (fp8_model / "bf16").exists()
    result = convert("--src", str(fp8_model), "--dst", str(fp8_model.parent))
    assert result.returncode == 2 and "contains the source" in result.stderr
    assert snapshot(fp8_model) == before
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("mine")
    result = convert("--src", str(fp8_model), "--dst", str(unrelated))
    assert result.returncode == 2 and "not empty" in result.stderr and "--overwrite" in result.stderr
    assert [p.name for p in unrelated.iterdir()] == ["notes.txt"]
    assert convert("--src", str(fp8_model), "--dst", str(unrelated), "--overwrite").returncode == 0
    assert (unrelated / "notes.txt").read_text() == "mine"


def test_not_enough_space_is_refused_before_writing(fp8_model, tmp_path, monkeypatch):
    dst = tmp_path / "small-disk"
    plan = plan_cast(fp8_model, dst, CastOptions())

    class Usage:
        free = 1000

    monkeypatch.setattr("converters.preflight.shutil.disk_usage", lambda path: Usage())
    with pytest.raises(ConvertError, match="not enough space"):
        run_cast(plan)
    assert not list(dst.glob("*.safetensors"))


def test_single_file_checkpoint(fp8_model, tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    save_file(load_dir(fp8_model), str(single / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(fp8_model / "config.json", single / "config.json")
    dst = tmp_path / "single-out"
    assert convert("--src", str(single), "--dst", str(dst)).returncode == 0
    assert set(load_file(dst / "model.safetensors")) == set(dequantised(load_dir(fp8_model)))
    assert not (dst / "model.safetensors.index.json").exists()


def test_help_and_bad_arguments():
    result = subprocess.run([sys.executable, "-m", "converters.cli", "fp8-bf16", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--drop-mtp" in result.stdout and "exit codes" in result.stdout
    result = convert("--src", "a", "--dst", "b", "--shard", "3/2")
    assert result.returncode == 2 and "0 <= I < N" in result.stderr


# Faults, as a user meets them: each asserts the exit code, the message, that no process is left
# behind, and that re-running the same command ends byte-identical to an uninterrupted run.

SLOW = ["--batch-mb", "1", "--max-write-mbps", "3"]


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("faults")
    make_fp8_checkpoint(root / "src", shards=6, overrides={"num_hidden_layers": 6, "n_routed_experts": 16})
    assert convert("--src", str(root / "src"), "--dst", str(root / "reference")).returncode == 0
    return {"src": root / "src", "reference": root / "reference"}


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "converters.cli", "fp8-bf16", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def resume_and_compare(slow_model, dst: Path) -> None:
    result = convert("--src", str(slow_model["src"]), "--dst", str(dst))
    assert result.returncode == 0, result.stderr
    assert snapshot(dst) == snapshot(slow_model["reference"])


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill-9-worker", "sigterm-parent"])
def test_workers_under_kill_and_sigterm(slow_model, tmp_path, fault):
    dst = tmp_path / "out"
    process = start("--quiet", "--src", str(slow_model["src"]), "--dst", str(dst), "--workers", "2", "--device", "cpu", *SLOW)
    wait_until(lambda: len(spawned_workers(process.pid)) == 2 and len(list((dst / ".fp8-bf16").glob("model-*.tmp"))) == 2, process)
    workers = spawned_workers(process.pid)
    everyone = [p.pid for p in psutil.Process(process.pid).children(recursive=True)]
    if fault == "kill-9-worker":
        os.kill(workers[0].pid, signal.SIGKILL)
    else:
        process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=60)
    stderr = process.stderr.read()
    assert "Traceback" not in stderr
    if fault == "kill-9-worker":
        assert code == 4, stderr
        assert f"(pid {workers[0].pid}) was killed by SIGKILL" in stderr and "re-run" in stderr
    else:
        assert code == 143, stderr
        assert "interrupted by SIGTERM" in stderr and "re-run the same command to resume" in stderr
        assert not list((dst / ".fp8-bf16").glob("*.tmp"))  # the workers removed their unfinished shards
    assert_gone(everyone)
    assert not (dst / "model.safetensors.index.json").exists()
    resume_and_compare(slow_model, dst)


@pytest.mark.slow
def test_disk_full_exits_3_naming_the_file_and_resumes(slow_model, tmpfs):
    small_tmpfs = tmpfs("96m")  # room for the output and the free-space margin, until the ballast comes
    dst = small_tmpfs / "out"
    process = start("--quiet", "--src", str(slow_model["src"]), "--dst", str(dst), *SLOW)
    wait_until(lambda: bool(list((dst / ".fp8-bf16").glob("model-*.tmp"))), process)
    ballast = fill(small_tmpfs)  # the disk fills up after the free-space check passed
    code = process.wait(timeout=120)
    stderr = process.stderr.read()
    assert code == 3, stderr
    assert "Traceback" not in stderr and "No space left on device" in stderr
    assert f"{dst}/model-0000" in stderr and "free space and re-run to resume" in stderr
    assert not list((dst / ".fp8-bf16").glob("*.tmp"))
    ballast.unlink()
    resume_and_compare(slow_model, dst)


def test_refused_preflight_leaves_the_destination_as_it_was(fp8_model, tmpfs):
    small_tmpfs = tmpfs("8m")  # less than the output plus the margin
    dst = small_tmpfs / "out"
    for extra in ((), ("--drop-mtp",)):  # the retry is refused for space again, not as "another conversion"
        result = convert("--src", str(fp8_model), "--dst", str(dst), *extra)
        assert result.returncode == 2 and "not enough space" in result.stderr, result.stderr
        assert not dst.exists() and [p.name for p in small_tmpfs.iterdir()] == []
    dst.mkdir()
    assert convert("--src", str(fp8_model), "--dst", str(dst)).returncode == 2
    assert list(dst.iterdir()) == []


def test_unreadable_files_and_bad_config_are_refused_before_writing(broken, tmp_path, converted):
    dst = tmp_path / "out"
    (broken / "tokenizer_extra.json").symlink_to(broken / "nowhere.json")
    result = convert("--src", str(broken), "--dst", str(dst))
    assert result.returncode == 2 and "tokenizer_extra.json" in result.stderr and "cannot be read" in result.stderr
    assert not dst.exists()
    (broken / "tokenizer_extra.json").unlink()
    config = (broken / "config.json").read_text()
    (broken / "config.json").write_text("[1, 2]")
    result = convert("--src", str(broken), "--dst", str(dst))
    assert result.returncode == 2 and "config.json: the top level is a list, not an object" in result.stderr
    assert "Traceback" not in result.stderr and not dst.exists()
    (broken / "config.json").write_text(config)
    assert convert("--src", str(broken), "--dst", str(dst)).returncode == 0
    assert snapshot(dst) == snapshot(converted)


@pytest.mark.slow
def test_concurrent_runs_identical_refused_other_part_alongside(slow_model, tmp_path):
    dst = tmp_path / "out"
    source = ["--src", str(slow_model["src"]), "--dst", str(dst)]
    first = start("--quiet", *source, "--shard", "0/2", "--batch-mb", "1", "--max-write-mbps", "0.5")  # ~20 s
    wait_until(lambda: (dst / ".fp8-bf16" / "claim.json").is_file() and bool(list((dst / ".fp8-bf16").glob("model-*.tmp"))), first)
    before = {p.name for p in (dst / ".fp8-bf16").iterdir()}
    duplicate = convert(*source, "--shard", "0/2")
    assert duplicate.returncode == 2, duplicate.stderr
    assert f"part 0/2 is already being written by pid {first.pid} on host {socket.gethostname()}" in duplicate.stderr
    assert {p.name for p in (dst / ".fp8-bf16").iterdir()} <= before | {p.name for p in (dst / ".fp8-bf16").glob("model-*.tmp")}
    other = convert(*source, "--shard", "1/2")
    assert other.returncode == 1, other.stderr  # ran alongside; part 0 is still going
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert snapshot(dst) == snapshot(slow_model["reference"])


def test_mismatched_shard_counts_are_refused(fp8_model, converted, tmp_path):
    dst = tmp_path / "parts"
    assert convert("--src", str(fp8_model), "--dst", str(dst), "--shard", "0/2").returncode == 1
    before = snapshot(dst)
    result = convert("--src", str(fp8_model), "--dst", str(dst), "--shard", "1/3")
    assert result.returncode == 2
    assert "converted in 2 parts (--shard I/2) but this run says --shard 1/3" in result.stderr
    assert snapshot(dst) == before
    assert convert("--src", str(fp8_model), "--dst", str(dst), "--shard", "1/2").returncode == 0
    assert snapshot(dst) == snapshot(converted)


def test_progress_in_a_log_file_has_no_carriage_returns(fp8_model, tmp_path):
    result = subprocess.run([sys.executable, "-m", "converters.cli", "fp8-bf16", "--src", str(fp8_model), "--dst", str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("fp8->bf16: ")]
    assert len(lines) >= 5 and "(100%)" in lines[-1] and "MB/s" in lines[-1]
