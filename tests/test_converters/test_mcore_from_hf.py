"""convert hf-mcore: checkpoints loaded into real Megatron-Core models (CPU, gloo) against HF logits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from convert_cli import convert, to_mcore
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import FileSystemReader

from converters.mcore import dist_ckpt
from converters.mcore.check import ATOL, compare
from converters.mcore.from_hf import McoreOptions, plan_conversion, run_conversion
from converters.testing import make_fp8_checkpoint


@pytest.fixture(scope="module")
def models(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-mcore")
    return {**tiny_checkpoints, "root": root, "te": to_mcore(tiny_checkpoints["fp8"], root / "mcore-te")}


def test_layout_and_metadata_files(models):
    release = models["te"]
    assert json.loads((release / "metadata.json").read_text()) == dist_ckpt.CHECKPOINT_METADATA
    assert torch.load(release / "common.pt") == {"checkpoint_version": 3.0, "iteration": 0}
    assert (release / ".metadata").is_file() and list(release.glob("__*_0.distcp"))
    assert not (release / dist_ckpt.STATE_DIR).exists()


def test_fp8_and_bf16_sources_give_the_same_tensor_files(models):
    from_bf16 = to_mcore(models["bf16"], models["root"] / "mcore-from-bf16")
    files = sorted(p.name for p in models["te"].glob("*.distcp"))
    assert files == sorted(p.name for p in from_bf16.glob("*.distcp"))
    for name in files:
        assert (models["te"] / name).read_bytes() == (from_bf16 / name).read_bytes()


def test_te_names_tp1_logits_match_hf(models):
    # the TE spec's names, loaded into a local-spec model through sharded_state_dict_keys_map
    assert compare(models["bf16"], models["te"], spec="te") <= ATOL


def test_local_spec_tp1_logits_match_hf(models):
    local = to_mcore(models["fp8"], models["root"] / "mcore-local", "--spec", "local")
    assert compare(models["bf16"], local, spec="local") <= ATOL


@pytest.mark.slow
@pytest.mark.parametrize("layout", [{"tp": 2}, {"ep": 2}, {"pp": 2}], ids=["tp2", "ep2", "pp2"])
def test_parallel_layouts_load_and_match_hf(models, layout):
    assert compare(models["bf16"], models["te"], spec="te", **layout) <= ATOL


def test_q_lora_rank_null_and_no_mtp(tmp_path):
    fp8, bf16 = tmp_path / "fp8", tmp_path / "bf16"
    make_fp8_checkpoint(fp8, overrides={"q_lora_rank": None, "num_nextn_predict_layers": 0}, shards=2)
    assert convert("fp8-bf16", "--src", str(fp8), "--dst", str(bf16)).returncode == 0
    release = to_mcore(fp8, tmp_path / "mcore")
    assert compare(bf16, release, spec="te") <= ATOL


def test_drop_mtp_leaves_mtp_out(models, tmp_path):
    release = to_mcore(models["fp8"], tmp_path / "mcore", "--drop-mtp", "--json")
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(release)).read_metadata().state_dict_metadata
    assert keys and not any(key.startswith("mtp.") for key in keys)


def test_the_how_tos_order_works_first_time(models, tmp_path):
    """The how-to's own steps: cast without --drop-mtp, edit config.json (`patcher apply`: no MTP layer), then
    hf-mcore of the BF16 dir. config.json is the model: the MTP layer's tensors are skipped with one line."""
    bf16 = tmp_path / "bf16"
    shutil.copytree(models["bf16"], bf16)
    patched = subprocess.run([sys.executable, "-m", "patcher.cli", "apply", str(bf16)], capture_output=True, text=True)
    assert patched.returncode == 0, patched.stderr
    result = subprocess.run([sys.executable, "-m", "converters.cli", "hf-mcore", "--src", str(bf16), "--dst", str(tmp_path / "mc"),
                             "--quiet"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    layers = json.loads((bf16 / "config.json").read_text())["num_hidden_layers"]
    assert f"config.json declares no MTP layer: 44 tensors of layer {layers} skipped" in result.stdout
    keys = FileSystemReader(str(tmp_path / "mc" / "release")).read_metadata().state_dict_metadata
    assert not any(key.startswith("mtp.") for key in keys)
    assert compare(bf16, tmp_path / "mc" / "release", spec="te") <= ATOL
    # and back: a checkpoint that keeps its MTP layer exports what the patched config.json declares
    result = subprocess.run([sys.executable, "-m", "converters.cli", "mcore-hf", "--src", str(models["te"]), "--hf-config", str(bf16),
                             "--dst", str(tmp_path / "hf"), "--quiet"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "config.json declares no MTP layer (num_nextn_predict_layers 0): 19 stored MTP tensors left out" in result.stdout
    exported = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    assert exported and not any(name.startswith(f"model.layers.{layers}.") for name in exported)
    # the reverse: config.json declares more MTP layers than the shards hold
    config = json.loads((models["fp8"] / "config.json").read_text())
    more = broken_copy(models, tmp_path / "more")
    (more / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 2}))
    result = convert("hf-mcore", "--src", str(more), "--dst", str(tmp_path / "out"))
    assert result.returncode == 2 and f"model.layers.{layers + 1}.eh_proj.weight" in result.stderr and "missing" in result.stderr


def test_workers_and_parts_write_identical_bins(models, tmp_path):
    single = to_mcore(models["fp8"], tmp_path / "single", "--bin-mb", "1")
    workers = to_mcore(models["fp8"], tmp_path / "workers", "--bin-mb", "1", "--workers", "2")
    first = convert("hf-mcore", "--src", str(models["fp8"]), "--dst", str(tmp_path / "parts"), "--bin-mb", "1", "--shard", "0/2")
    assert first.returncode == 1 and not (tmp_path / "parts" / "release" / ".metadata").exists()
    parts = to_mcore(models["fp8"], tmp_path / "parts", "--bin-mb", "1", "--shard", "1/2")
    names = sorted(p.name for p in single.iterdir())
    assert len([n for n in names if n.endswith(".distcp")]) > 3
    for other in (workers, parts):
        assert sorted(p.name for p in other.iterdir()) == names
        for name in names:
            if name.endswith(".distcp"):
                assert (single / name).read_bytes() == (other / name).read_bytes(), name


def test_failure_midway_then_resume_is_identical(models, tmp_path, monkeypatch):
    reference = to_mcore(models["fp8"], tmp_path / "reference", "--bin-mb", "1")
    options = McoreOptions(bin_bytes=1024 * 1024)
    plan = plan_conversion(models["fp8"], tmp_path / "resumed", options)
    calls = {"count": 0}
    real_write = dist_ckpt.BinWriter.write

    def failing_write(writer, index, pieces, make_chunk, progress=lambda n: None):
        calls["count"] += 1
        if calls["count"] == 3:  # die in the middle of the third bin, its file half written
            (writer.release / f"__{index}_0.distcp").write_bytes(b"partial")
            raise RuntimeError("killed")
        return real_write(writer, index, pieces, make_chunk, progress)

    monkeypatch.setattr(dist_ckpt.BinWriter, "write", failing_write)
    with pytest.raises(RuntimeError, match="killed"):
        run_conversion(plan)
    assert not (tmp_path / "resumed" / "release" / ".metadata").exists()
    monkeypatch.setattr(dist_ckpt.BinWriter, "write", real_write)
    summary = run_conversion(plan_conversion(models["fp8"], tmp_path / "resumed", options))
    assert summary.finalized and summary.bins_skipped == 2
    resumed = tmp_path / "resumed" / "release"
    # identical files; .metadata differs only where it records the output path
    for path in reference.iterdir():
        if path.name not in (".metadata", dist_ckpt.DONE_FILE):
            assert (resumed / path.name).read_bytes() == path.read_bytes(), path.name


def broken_copy(models, tmp_path) -> Path:
    copy = tmp_path / "broken"
    shutil.copytree(models["bf16"], copy)
    return copy


def rewrite(model: Path, change) -> None:
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in sorted(set(index["weight_map"].values())):
        state = load_file(model / shard)
        change(state)
        save_file(state, str(model / shard), metadata={"format": "pt"})
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard} | dict.fromkeys(state, shard)
    index_path.write_text(json.dumps(index))


def test_missing_tensors_are_listed(models, tmp_path):
    copy = broken_copy(models, tmp_path)
    rewrite(copy, lambda state: state.pop("model.layers.1.mlp.experts.5.up_proj.weight", None))
    result = convert("hf-mcore", "--src", str(copy), "--dst", str(tmp_path / "out"))
    assert result.returncode == 2 and "model.layers.1.mlp.experts.5.up_proj.weight" in result.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_tensor_and_architecture(models, tmp_path):
    copy = broken_copy(models, tmp_path)
    rewrite(copy, lambda state: state.update({"model.layers.0.mystery.weight": torch.zeros(2)}) if "model.norm.weight" in state else None)
    result = convert("hf-mcore", "--src", str(copy), "--dst", str(tmp_path / "out"))
    assert result.returncode == 2 and "model.layers.0.mystery.weight" in result.stderr
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    result = convert("hf-mcore", "--src", str(copy), "--dst", str(tmp_path / "out"))
    assert result.returncode == 2 and "not a DeepSeek-V3-class model" in result.stderr


def test_shapes_that_disagree_with_config(models, tmp_path):
    copy = broken_copy(models, tmp_path)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "kv_lora_rank": config["kv_lora_rank"] + 8}))
    result = convert("hf-mcore", "--src", str(copy), "--dst", str(tmp_path / "out"))
    assert result.returncode == 2 and "kv_a_proj_with_mqa" in result.stderr and "config.json implies" in result.stderr


def test_unsafe_destinations(models, tmp_path):
    for dst, message in ((models["fp8"] / "out", "inside the source"), (models["fp8"], "is the source")):
        result = convert("hf-mcore", "--src", str(models["fp8"]), "--dst", str(dst))
        assert result.returncode == 2 and message in result.stderr
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "keep.txt").write_text("mine")
    result = convert("hf-mcore", "--src", str(models["fp8"]), "--dst", str(unrelated))
    assert result.returncode == 2 and "--overwrite" in result.stderr


def test_rerun_is_a_no_op(models):
    before = {p.name: p.read_bytes() for p in models["te"].iterdir()}
    result = convert("hf-mcore", "--src", str(models["fp8"]), "--dst", str(models["te"].parent), "--json")
    assert result.returncode == 0 and "already complete" in result.stdout
    assert {p.name: p.read_bytes() for p in models["te"].iterdir()} == before


def test_bins_bound_file_sizes(models, tmp_path):
    release = to_mcore(models["fp8"], tmp_path / "small-bins", "--bin-mb", "1")
    sizes = [p.stat().st_size for p in release.glob("*.distcp")]
    biggest_piece = 400 * 320 * 2  # the largest single chunk here (eh_proj / embeddings) fits in a bin
    assert max(sizes) <= 1024 * 1024 + biggest_piece + 64 * 1024


@pytest.mark.parametrize("spec", ["te", "local"])
def test_round_trip_hf_mcore_hf_is_byte_identical(models, tmp_path, spec):
    from converters.mcore.check import hf_logits
    from converters.testing import load_checkpoint

    release = to_mcore(models["bf16"], tmp_path / "mcore", "--spec", spec, "--bin-mb", "1")
    back = tmp_path / "back"
    result = convert("mcore-hf", "--src", str(release.parent), "--hf-config", str(models["bf16"]), "--dst", str(back))
    assert result.returncode == 0, result.stderr
    original, exported = load_checkpoint(models["bf16"]), load_checkpoint(back)
    assert set(original) == set(exported)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype, name
        assert torch.equal(exported[name].view(torch.uint8), tensor.view(torch.uint8)), name
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in exported.values())
    ids = torch.randint(0, 320, (1, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(hf_logits(back, ids), hf_logits(models["bf16"], ids))


def test_mcore_hf_refuses_incomplete_checkpoints(models, tmp_path):
    (tmp_path / "empty").mkdir()
    result = convert("mcore-hf", "--src", str(tmp_path / "empty"), "--hf-config", str(models["bf16"]), "--dst", str(tmp_path / "out"))
    assert result.returncode == 2 and "no .metadata" in result.stderr
    release = to_mcore(models["bf16"], tmp_path / "mcore", "--drop-mtp")
    # a config that asks for more experts than the checkpoint holds
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    config = json.loads((models["bf16"] / "config.json").read_text())
    (config_dir / "config.json").write_text(json.dumps({**config, "num_hidden_layers": config["num_hidden_layers"] + 1}))
    result = convert("mcore-hf", "--src", str(release), "--hf-config", str(config_dir), "--dst", str(tmp_path / "out2"))
    assert result.returncode == 2 and "missing" in result.stderr and "decoder.layers.3." in result.stderr


@pytest.mark.slow
def test_kill_minus_nine_then_resume(tmp_path):
    import os
    import signal
    import time

    source = tmp_path / "src"
    make_fp8_checkpoint(source, overrides={"hidden_size": 512, "n_routed_experts": 32, "moe_intermediate_size": 256, "num_hidden_layers": 4}, shards=3)
    reference = to_mcore(source, tmp_path / "reference", "--bin-mb", "1")
    dst = tmp_path / "killed"
    command = [sys.executable, "-m", "converters.cli", "hf-mcore", "--src", str(source), "--dst", str(dst), "--bin-mb", "1", "--quiet"]
    process = subprocess.Popen(command)
    state = dst / "release" / dist_ckpt.STATE_DIR
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None and len(list(state.glob("bin_*.results"))) < 3:
        time.sleep(0.005)
    assert process.poll() is None, "the conversion finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (dst / "release" / ".metadata").exists()
    resumed = subprocess.run([*command, "--json"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["bins_skipped"] >= 3
    for path in reference.iterdir():
        if path.name not in (".metadata", dist_ckpt.DONE_FILE):
            assert (dst / "release" / path.name).read_bytes() == path.read_bytes(), path.name


@pytest.mark.parametrize("readers", [1, 3])
def test_streaming_planner_prefetches_within_its_budget_in_any_order(models, tmp_path, readers):
    """The background readers give the writer the same tensors, in plan order or not, never more than the
    budget ahead; with a buffer pool, a tensor's buffer is reused only after the writer asked for the next one."""
    from converters.hf.buffers import BufferPool
    from converters.hf.checkpoint import HFCheckpoint
    from converters.mcore.from_hf import _chunk_reader

    plan = plan_conversion(models["fp8"], tmp_path / "out", McoreOptions())
    pieces = [p for p in max(plan.bins, key=len) if p.chunk is not None]
    source = HFCheckpoint(models["fp8"])
    direct = _chunk_reader(source)
    pool = BufferPool(dist_ckpt.PREFETCH_BYTES)
    pooled = _chunk_reader(source, pool)
    outstanding = {"max": 0}
    budget = 3 * max(p.nbytes for p in pieces)
    for order in (pieces, pieces[::-1], pieces[1::2] + pieces[::2]):
        planner = dist_ckpt.StreamingPlanner(pieces, pooled, lambda n: None, prefetch_bytes=budget, readers=readers, recycle=pool.give)
        with planner.prefetching():
            previous = None
            for piece in order:
                pending = sum(planner.pieces[i].nbytes for i in planner.pending)
                outstanding["max"] = max(outstanding["max"], pending)
                if previous is not None:  # the tensor being written: untouched by the readers meanwhile
                    time.sleep(0.01)
                    assert torch.equal(previous[0], previous[1])
                got = planner.resolve_data(piece.item)
                assert torch.equal(got, direct(piece.chunk).reshape(got.shape)), piece.item.index
                previous = (got, got.clone())
            planner.done_with_last()
        assert not planner.pending
    assert 0 < outstanding["max"] <= budget
    assert pool.reused > pool.allocated  # most chunks were read into buffers used before


def test_buffer_pool_lends_exact_sizes_and_keeps_idle_ones_within_its_limit():
    from converters.hf.buffers import BufferPool

    pool = BufferPool(idle_limit=100)
    a, b = pool.take(40), pool.take(40)
    assert a.numel() == 40 and a.dtype == torch.uint8 and a.data_ptr() != b.data_ptr()
    pool.give(a.view(torch.int16).view(4, 5))  # any view of a lent buffer gives it back
    assert pool.take(40).data_ptr() == a.data_ptr() and pool.reused == 1
    pool.give(torch.empty(40, dtype=torch.uint8))  # not ours: ignored
    assert pool.take(30).numel() == 30 and pool.allocated == 3  # no buffer of that size: a new one
    big = pool.take(60)
    pool.give(b), pool.give(big)  # 100 bytes idle: both kept
    pool.give(a)  # 140 idle > 100: the least recently returned (b) is dropped
    assert pool.take(60).data_ptr() == big.data_ptr()
    assert pool.take(40).data_ptr() == a.data_ptr()
    assert pool.take(40).data_ptr() not in (a.data_ptr(), big.data_ptr())


def test_more_readers_give_identical_files(models, tmp_path):
    release = to_mcore(models["fp8"], tmp_path / "readers", "--readers", "3")
    names = sorted(p.name for p in models["te"].iterdir())
    assert names == sorted(p.name for p in release.iterdir()) and ".metadata" in names
    for name in names:
        if name != ".metadata":  # which holds the output path
            assert (release / name).read_bytes() == (models["te"] / name).read_bytes(), name
    ours, reference = (FileSystemReader(str(path)).read_metadata() for path in (release, models["te"]))
    assert ours.state_dict_metadata == reference.state_dict_metadata and ours.storage_data == reference.storage_data


def test_default_readers_follow_the_device_and_the_cores(monkeypatch):
    from converters.mcore import from_hf

    for cores, workers, expected in ((2, 1, 1), (8, 1, 2), (16, 1, 4), (128, 1, 4), (16, 2, 2), (16, 8, 1)):
        monkeypatch.setattr(from_hf.os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert from_hf.default_readers("cpu", workers) == expected, (cores, workers)
        assert from_hf.default_readers("cuda", workers) == 1


# Faults: exit code, message, no process left behind, and a resumed result identical to an uninterrupted one.

@pytest.fixture(scope="module")
def wide_model(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-mcore-faults")
    overrides = {"hidden_size": 512, "n_routed_experts": 32, "moe_intermediate_size": 256, "num_hidden_layers": 4}
    make_fp8_checkpoint(root / "src", overrides=overrides, shards=3)
    return {"src": root / "src", "reference": to_mcore(root / "src", root / "reference", "--bin-mb", "1")}


def assert_resumes_identically(wide_model, dst: Path) -> None:
    resumed = convert("hf-mcore", "--src", str(wide_model["src"]), "--dst", str(dst), "--bin-mb", "1")
    assert resumed.returncode == 0, resumed.stderr
    for path in wide_model["reference"].iterdir():
        if path.name not in (".metadata", dist_ckpt.DONE_FILE):  # these record the output path
            assert (dst / "release" / path.name).read_bytes() == path.read_bytes(), path.name


def start_mcore(src: Path, dst: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "converters.cli", "hf-mcore", "--src", str(src), "--dst", str(dst), "--bin-mb", "1", "--quiet", *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill-9-worker", "sigint"])
def test_dead_worker_and_ctrl_c(wide_model, tmp_path, fault):
    import signal

    import psutil
    from faults import assert_gone, spawned_workers, wait_until

    dst = tmp_path / "out"
    workers = ("--workers", "2") if fault == "kill-9-worker" else ()
    # a write limit keeps the conversion going for seconds, so that the fault always lands mid-way (without it a
    # fast machine sometimes finished before the SIGINT arrived: exit 0 instead of 130)
    process = start_mcore(wide_model["src"], dst, *workers, "--max-write-mbps", "8")
    state = dst / "release" / dist_ckpt.STATE_DIR
    wait_until(lambda: (not workers or len(spawned_workers(process.pid)) == 2) and len(list(state.glob("bin_*.results"))) >= 1, process)
    everyone = [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
    if fault == "kill-9-worker":
        victim = spawned_workers(process.pid)[0].pid
        os.kill(victim, signal.SIGKILL)
    else:
        process.send_signal(signal.SIGINT)
    code = process.wait(timeout=60)
    stderr = process.stderr.read()
    assert "Traceback" not in stderr, stderr
    if fault == "kill-9-worker":
        assert code == 4 and f"(pid {victim}) was killed by SIGKILL" in stderr, stderr
    else:
        assert code == 130 and "interrupted by SIGINT" in stderr and "re-run the same command to resume" in stderr, stderr
    assert_gone(everyone)
    assert not (dst / "release" / ".metadata").exists()
    assert_resumes_identically(wide_model, dst)


@pytest.mark.slow
def test_disk_full_names_the_bin_and_says_free_space(wide_model, tmpfs):
    from faults import fill, wait_until

    mount_point = tmpfs("256m")  # the output (~115 MB) and the free-space margin fit, until the ballast comes
    dst = mount_point / "out"
    process = start_mcore(wide_model["src"], dst)
    wait_until(lambda: (dst / "release" / "__0_0.distcp").exists(), process)
    ballast = fill(mount_point)
    code = process.wait(timeout=120)
    stderr = process.stderr.read()
    assert code == 3 and "Traceback" not in stderr, stderr
    assert "No space left on device" in stderr and f"{dst}/release/__" in stderr and "free space and re-run to resume" in stderr
    ballast.unlink()
    assert_resumes_identically(wide_model, dst)


def test_duplicate_run_and_bad_config_are_refused(models, tmp_path):
    from converters.jobs.claim import Destination

    dst = tmp_path / "out"
    plan = plan_conversion(models["fp8"], dst, McoreOptions())
    destination: Destination = plan.destination()
    with destination.claim():  # as a run in progress holds it
        result = convert("hf-mcore", "--src", str(models["fp8"]), "--dst", str(dst))
        assert result.returncode == 2 and f"part 0/1 is already being written by pid {os.getpid()}" in result.stderr
    copy = broken_copy(models, tmp_path)
    (copy / "config.json").write_text('"DeepSeek-V3"')
    result = convert("hf-mcore", "--src", str(copy), "--dst", str(tmp_path / "other"))
    assert result.returncode == 2 and "the top level is a str, not an object" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "other").exists()


def test_convert_check_is_the_checker_with_its_exit_codes(models, tmp_path):
    """`convert check` runs the logits check (the old `python -m` paths stay aliases); bad input is exit 2."""
    result = subprocess.run([sys.executable, "-m", "converters.cli", "check", "--hf", str(models["bf16"]), "--mcore", str(models["te"]),
                             "--backend", "cpu", "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ok"]
    result = subprocess.run([sys.executable, "-m", "converters.cli", "check", "--hf", str(tmp_path), "--mcore", str(models["te"])],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("convert check: error:") and "config.json" in result.stderr


# convert mcore-hf runs the same job lifecycle as the other two: finished mark, claim, resume.

def tree_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_mcore_hf_rerun_on_a_finished_export_is_a_no_op(models, tmp_path):
    dst = tmp_path / "hf"
    args = ("mcore-hf", "--src", str(models["te"].parent), "--hf-config", str(models["bf16"]), "--dst", str(dst))
    assert convert(*args).returncode == 0
    assert (dst / ".mcore-hf-source.json").is_file() and not (dst / ".mcore-hf").exists()
    before = {name: (data, (dst / name).stat().st_mtime_ns) for name, data in tree_bytes(dst).items()}
    again = convert(*args)
    assert again.returncode == 0 and again.stdout.startswith("already complete: nothing to do"), again.stdout + again.stderr
    assert {name: (data, (dst / name).stat().st_mtime_ns) for name, data in tree_bytes(dst).items()} == before
    summary = json.loads(convert(*args, "--json").stdout)
    assert summary["shards_written"] == 0 and summary["shards_skipped"] == summary["shards"] == 1 and summary["finalized"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    refused = convert("mcore-hf", "--src", str(models["te"].parent), "--hf-config", str(models["bf16"]), "--dst", str(other))
    assert refused.returncode == 2 and "not empty (notes.txt)" in refused.stderr and "--overwrite" in refused.stderr
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_mcore_hf_twin_run_is_refused_by_the_lock(models, tmp_path):
    from converters.mcore.to_hf import plan_export

    dst = tmp_path / "hf"
    with plan_export(models["te"].parent, models["bf16"], dst).destination().claim():  # as a run in progress holds it
        result = convert("mcore-hf", "--src", str(models["te"].parent), "--hf-config", str(models["bf16"]), "--dst", str(dst))
        assert result.returncode == 2 and f"part 0/1 is already being written by pid {os.getpid()}" in result.stderr, result.stderr
    assert not list(dst.glob("*.safetensors"))


def test_mcore_hf_resumes_an_interrupted_export_byte_identically(models, tmp_path, monkeypatch):
    from converters.mcore import to_hf

    shard_bytes = 150_000  # the tiny model in many shards
    reference = tmp_path / "reference"
    to_hf.export_hf(to_hf.plan_export(models["te"].parent, models["bf16"], reference, shard_bytes=shard_bytes))
    dst = tmp_path / "hf"
    plan = to_hf.plan_export(models["te"].parent, models["bf16"], dst, shard_bytes=shard_bytes)
    assert len(plan.shards) > 3
    real_write, calls = to_hf.ShardExport.write, {"count": 0}

    def failing_write(writer, index, progress):
        calls["count"] += 1
        if calls["count"] == 3:
            raise RuntimeError("killed")
        return real_write(writer, index, progress)

    monkeypatch.setattr(to_hf.ShardExport, "write", failing_write)
    with pytest.raises(RuntimeError, match="killed"):
        to_hf.export_hf(plan)
    monkeypatch.setattr(to_hf.ShardExport, "write", real_write)
    assert len(list(dst.glob("*.safetensors"))) == 2
    assert not (dst / "model.safetensors.index.json").exists() and not (dst / to_hf.FINISHED_FILE).exists()
    summary = to_hf.export_hf(to_hf.plan_export(models["te"].parent, models["bf16"], dst, shard_bytes=shard_bytes))
    assert summary.finalized and summary.shards_skipped == 2 and summary.shards_written == len(plan.shards) - 2
    assert not plan.state_dir.exists()
    assert tree_bytes(dst) == tree_bytes(reference)  # the finished marks too: same source, same options
