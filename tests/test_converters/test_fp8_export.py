"""convert bf16-fp8 and mcore-hf --fp8: DeepSeek's FP8 release format, from BF16 and from a trained torch_dist.

The release here is our generated tiny DeepSeek-V3 FP8 checkpoint (the real layout: e4m3 projections with
128x128 float32 scale_inv, one scale in another shard than its weight, MTP layer 3). What is asserted:
FP8 -> fp8-bf16 -> bf16-fp8 --like gives the release's bytes back; so does FP8 -> hf-mcore -> mcore-hf --fp8
--like; a changed model gets fresh scales where it changed and stays within e4m3's half step; the usual
lifecycle (rerun, resume) and refusals that name the tensor.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from convert_cli import convert, to_mcore
from faults import wait_until
from safetensors.torch import load_file, save_file

from converters.mcore.check import hf_logits
from converters.testing import is_fp8_weight, load_checkpoint, make_fp8_checkpoint

SCALE_ELSEWHERE = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"


def shard_files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.glob("*.safetensors"))}


def index_of(path: Path) -> dict:
    return json.loads((path / "model.safetensors.index.json").read_text())


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """Our tiny release with its scales moved off the recipe (x (1 + u * 2**-9)), as a release made from float32
    weights has them: a fresh amax / 448 of the dequantised BF16 block does not find them again, only the kept
    prior does; the codes stay the release's."""
    path = tmp_path_factory.mktemp("release") / "DeepSeek-V3-tiny"
    make_fp8_checkpoint(path, shards=3)
    generator = torch.Generator().manual_seed(3)
    for shard in sorted(path.glob("*.safetensors")):
        tensors = load_file(shard)
        for name in [n for n in tensors if n.endswith("_scale_inv")]:
            tensors[name] = tensors[name] * (1 + torch.rand(tensors[name].shape, generator=generator) * 2.0**-9)
        save_file(tensors, shard, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def bf16(release, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("bf16") / "bf16"
    result = convert("fp8-bf16", "--src", str(release), "--dst", str(dst))
    assert result.returncode == 0, result.stderr
    return dst


def test_round_trip_through_bf16_gives_the_release_back(release, bf16, tmp_path):
    out = tmp_path / "fp8"
    result = convert("bf16-fp8", "--src", str(bf16), "--dst", str(out), "--like", str(release), quiet=False)
    assert result.returncode == 0, result.stderr
    assert shard_files(out) == shard_files(release)  # every tensor's bytes, the moved scale_inv in its release shard
    assert (out / "config.json").read_bytes() == (release / "config.json").read_bytes()
    assert index_of(out) == index_of(release)
    assert (out / "tokenizer_config.json").read_bytes() == (release / "tokenizer_config.json").read_bytes()
    # a finished output: the same command again does nothing and says so by exit 0
    again = convert("bf16-fp8", "--src", str(bf16), "--dst", str(out), "--like", str(release), "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["shards_converted"] == 0


def test_without_like_the_model_description_chooses_the_release_tensors(release, bf16, tmp_path):
    out = tmp_path / "fp8"
    assert convert("bf16-fp8", "--src", str(bf16), "--dst", str(out)).returncode == 0
    ours, theirs = load_checkpoint(out), load_checkpoint(release)
    assert set(ours) == set(theirs)
    assert {name for name, t in ours.items() if t.dtype == torch.float8_e4m3fn} == \
        {name for name, t in theirs.items() if is_fp8_weight(name, t) and t.dtype == torch.float8_e4m3fn}
    assert all(ours[name].dtype == theirs[name].dtype for name in ours)
    # fresh scales (amax / 448 of the dequantised block) give the release's codes back, and scales within half a
    # bf16 step (2**-8) of the release's, not the release's own: only --like keeps those
    scales = [name for name in ours if name.endswith("_scale_inv")]
    assert all(torch.equal(ours[name].view(torch.uint8), theirs[name].view(torch.uint8)) for name in ours if ours[name].dtype == torch.float8_e4m3fn)
    assert all(torch.equal(ours[name], theirs[name]) for name in ours if ours[name].dtype != torch.float8_e4m3fn and name not in scales)
    assert all(((ours[name] / theirs[name] - 1).abs() <= 2.0**-8).all() for name in scales)
    assert sum(torch.equal(ours[name], theirs[name]) for name in scales) < len(scales) // 2
    assert json.loads((out / "config.json").read_text())["quantization_config"] == json.loads((release / "config.json").read_text())["quantization_config"]
    assert index_of(out)["weight_map"][SCALE_ELSEWHERE + "_scale_inv"] == index_of(out)["weight_map"][SCALE_ELSEWHERE]


def test_a_changed_model_gets_fresh_scales_where_it_changed(release, bf16, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(bf16, changed)
    index = index_of(changed)["weight_map"]
    name = "model.layers.1.mlp.experts.0.down_proj.weight"
    shard = changed / index[name]
    tensors = load_file(shard)
    generator = torch.Generator().manual_seed(5)
    weight = tensors[name].float()
    # noise on the first block column only: the other blocks are unchanged
    weight[:, :128] += torch.randn(weight[:, :128].shape, generator=generator) * weight.abs().max() * 0.05
    tensors[name] = weight.to(torch.bfloat16)
    save_file(tensors, shard, metadata={"format": "pt"})
    out = tmp_path / "fp8"
    assert convert("bf16-fp8", "--src", str(changed), "--dst", str(out), "--like", str(release)).returncode == 0
    ours, theirs = load_checkpoint(out), load_checkpoint(release)
    scale, before = ours[name + "_scale_inv"], theirs[name + "_scale_inv"]
    assert not torch.equal(scale[:, 0], before[:, 0]) and torch.equal(scale[:, 1:], before[:, 1:])
    untouched = [n for n in ours if n != name and n != name + "_scale_inv"]
    assert all(torch.equal(ours[n].view(torch.uint8), theirs[n].view(torch.uint8)) for n in untouched)
    # every element within half an e4m3 step of the BF16 weight: relative 2**-4 for normal codes,
    # absolute 2**-10 * scale in the subnormal range
    rows, cols = weight.shape
    scales = scale.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
    back = ours[name].float() * scales
    target = tensors[name].float()
    bound = torch.maximum(target.abs() * 2.0**-4, scales * 2.0**-10)
    assert ((back - target).abs() <= bound * (1 + 1e-6)).all()


def fake_quantised(weight: torch.Tensor, block: int = 128) -> torch.Tensor:
    """The release's recipe written out plainly (the definition, not our kernel): per block scale = amax / 448,
    codes = e4m3(w / scale), back to BF16 as the release is read (float32 code * scale, rounded)."""
    rows, cols = weight.shape
    padded = torch.zeros(-(-rows // block) * block, -(-cols // block) * block)
    padded[:rows, :cols] = weight.float()
    tiles = padded.view(padded.shape[0] // block, block, padded.shape[1] // block, block)
    amax = tiles.abs().amax(dim=(1, 3), keepdim=True)
    scale = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
    codes = (tiles / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    return (codes.float() * scale).view_as(padded)[:rows, :cols].to(torch.bfloat16)


def test_logits_of_the_fp8_model_against_bf16(release, bf16, tmp_path):
    """A changed model (1% noise on every matrix) quantised, read back through fp8-bf16: its logits are exactly
    those of the recipe applied by hand, and how far FP8 moves them from the BF16 model is printed (measured:
    max |diff| 0.23 of max |logit| 0.99, cosine 0.9947; the release fixture itself against the BF16 weights it
    was made from: 0.39, cosine 0.983 -- a random tiny model has no outlier-free structure for e4m3 to keep)."""
    noisy = tmp_path / "noisy"
    shutil.copytree(bf16, noisy)
    generator = torch.Generator().manual_seed(11)
    for shard in noisy.glob("*.safetensors"):
        tensors = load_file(shard)
        for name, tensor in tensors.items():
            if tensor.dim() == 2 and tensor.dtype == torch.bfloat16:
                tensors[name] = (tensor.float() * (1 + 0.01 * torch.randn(tensor.shape, generator=generator))).to(torch.bfloat16)
        save_file(tensors, shard, metadata={"format": "pt"})
    fp8, back, by_hand = tmp_path / "fp8", tmp_path / "back", tmp_path / "by-hand"
    assert convert("bf16-fp8", "--src", str(noisy), "--dst", str(fp8)).returncode == 0
    assert convert("fp8-bf16", "--src", str(fp8), "--dst", str(back)).returncode == 0
    quantised = {name for name, t in load_checkpoint(fp8).items() if t.dtype == torch.float8_e4m3fn}
    shutil.copytree(noisy, by_hand)
    for shard in by_hand.glob("*.safetensors"):
        tensors = load_file(shard)
        save_file({name: fake_quantised(t) if name in quantised else t for name, t in tensors.items()}, shard, metadata={"format": "pt"})
    ids = torch.tensor([[0, 5, 17, 99, 3, 250, 7, 1]])
    reference, served, expected = hf_logits(noisy, ids), hf_logits(back, ids), hf_logits(by_hand, ids)
    assert torch.equal(served, expected)
    diff = (served - reference).abs().max().item()
    cosine = torch.nn.functional.cosine_similarity(served.flatten(), reference.flatten(), dim=0).item()
    print(f"FP8 vs BF16 logits: max |diff| {diff:.3e}, cosine {cosine:.7f}, max |logit| {reference.abs().max().item():.3f}")
    assert cosine > 0.98


def test_mcore_hf_fp8_writes_the_release_from_a_torch_dist_checkpoint(release, tmp_path):
    mcore = to_mcore(release, tmp_path / "mcore")
    out = tmp_path / "fp8"
    result = convert("mcore-hf", "--src", str(mcore.parent), "--hf-config", str(release), "--dst", str(out), "--fp8",
                     "--like", str(release), quiet=False)
    assert result.returncode == 0, result.stderr
    assert "104 weights as FP8" in result.stdout
    assert shard_files(out) == shard_files(release)
    assert (out / "config.json").read_bytes() == (release / "config.json").read_bytes()
    assert index_of(out) == index_of(release)
    plain = tmp_path / "fp8-by-size"
    assert convert("mcore-hf", "--src", str(mcore.parent), "--hf-config", str(release), "--dst", str(plain), "--fp8").returncode == 0
    ours, theirs = load_checkpoint(plain), load_checkpoint(release)
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[n].view(torch.uint8), theirs[n].view(torch.uint8)) for n in ours if not n.endswith("_scale_inv"))
    assert all(((ours[n] / theirs[n] - 1).abs() <= 2.0**-8).all() for n in ours if n.endswith("_scale_inv"))


def test_refusals_name_what_is_wrong(release, bf16, tmp_path):
    already = convert("bf16-fp8", "--src", str(release), "--dst", str(tmp_path / "a"))
    assert already.returncode == 2 and "already FP8" in already.stderr and "fp8-bf16" in already.stderr
    other = tmp_path / "other"
    make_fp8_checkpoint(other, overrides={"moe_intermediate_size": 64}, shards=2)
    mismatch = convert("bf16-fp8", "--src", str(bf16), "--dst", str(tmp_path / "b"), "--like", str(other))
    assert mismatch.returncode == 2 and "down_proj.weight" in mismatch.stderr and "another model" in mismatch.stderr
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())
    v31 = tmp_path / "v31"
    shutil.copytree(release, v31)
    config = json.loads((v31 / "config.json").read_text())
    config["quantization_config"]["scale_fmt"] = "ue8m0"
    (v31 / "config.json").write_text(json.dumps(config))
    ue8m0 = convert("bf16-fp8", "--src", str(bf16), "--dst", str(tmp_path / "c"), "--like", str(v31))
    assert ue8m0.returncode == 2 and "ue8m0" in ue8m0.stderr
    poisoned = tmp_path / "poisoned"
    shutil.copytree(bf16, poisoned)
    name = "model.layers.1.self_attn.o_proj.weight"
    shard = poisoned / index_of(poisoned)["weight_map"][name]
    tensors = load_file(shard)
    tensors[name][130, 3] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    nan = convert("bf16-fp8", "--src", str(poisoned), "--dst", str(tmp_path / "e"))
    assert nan.returncode == 2 and name in nan.stderr and "row 130, column 3" in nan.stderr, nan.stderr
    assert not (tmp_path / "e" / shard.name).exists()  # the shard holding the NaN is not written
    assert (tmp_path / "e" / "model-00001-of-00003.safetensors").exists()  # the one finished before it is kept
    trained = to_mcore(poisoned, tmp_path / "poisoned-mcore")  # as a diverged training run would save it
    exported = convert("mcore-hf", "--src", str(trained), "--hf-config", str(release), "--dst", str(tmp_path / "h"), "--fp8")
    assert exported.returncode == 2 and name in exported.stderr and "row 130, column 3" in exported.stderr, exported.stderr
    unquantised = tmp_path / "unquantised"
    shutil.copytree(release, unquantised)
    config = json.loads((unquantised / "config.json").read_text())
    del config["quantization_config"]
    (unquantised / "config.json").write_text(json.dumps(config))
    no_config = convert("bf16-fp8", "--src", str(bf16), "--dst", str(tmp_path / "f"), "--like", str(unquantised))
    assert no_config.returncode == 2 and "quantization_config" in no_config.stderr and "fp8" in no_config.stderr
    before = shard_files(release)
    onto = convert("bf16-fp8", "--src", str(bf16), "--dst", str(release), "--like", str(release), "--overwrite")
    assert onto.returncode == 2 and "overlap" in onto.stderr
    assert shard_files(release) == before
    wrong_index = tmp_path / "wrong-index"
    shutil.copytree(bf16, wrong_index)
    index = index_of(wrong_index)
    moved = "model.norm.weight"
    index["weight_map"][moved] = next(s for s in sorted(set(index["weight_map"].values())) if s != index["weight_map"][moved])
    (wrong_index / "model.safetensors.index.json").write_text(json.dumps(index))
    stray = convert("bf16-fp8", "--src", str(wrong_index), "--dst", str(tmp_path / "g"))
    assert stray.returncode == 2 and f"maps {moved} here but the shard does not hold it" in stray.stderr, stray.stderr
    like_alone = convert("mcore-hf", "--src", str(tmp_path), "--hf-config", str(release), "--dst", str(tmp_path / "d"), "--like", str(release))
    assert like_alone.returncode == 2 and "--fp8" in like_alone.stderr


def test_like_a_release_with_mtp_for_a_model_without(release, tmp_path):
    """fp8-bf16 --drop-mtp, then bf16-fp8 --like the release (which has the MTP layer): the release's MTP tensors
    are not asked for; every other tensor comes back as the release has it; no other tool's finished mark is copied."""
    bf16 = tmp_path / "bf16"
    assert convert("fp8-bf16", "--src", str(release), "--dst", str(bf16), "--drop-mtp").returncode == 0
    out = tmp_path / "fp8"
    result = convert("bf16-fp8", "--src", str(bf16), "--dst", str(out), "--like", str(release))
    assert result.returncode == 0, result.stderr
    layers = json.loads((release / "config.json").read_text())["num_hidden_layers"]
    ours, theirs = load_checkpoint(out), load_checkpoint(release)
    assert set(ours) == {name for name in theirs if not name.startswith(f"model.layers.{layers}.")}
    assert all(torch.equal(ours[n].view(torch.uint8), theirs[n].view(torch.uint8)) for n in ours)
    assert (bf16 / ".fp8-bf16-source.json").exists() and not (out / ".fp8-bf16-source.json").exists()
    assert (out / ".bf16-fp8-source.json").exists()


def test_mtp_layers_follow_config_json(release, bf16, tmp_path):
    patched = tmp_path / "patched"
    shutil.copytree(bf16, patched)
    config = json.loads((patched / "config.json").read_text())
    config["num_nextn_predict_layers"] = 0
    (patched / "config.json").write_text(json.dumps(config, indent=2))
    out = tmp_path / "fp8"
    result = convert("bf16-fp8", "--src", str(patched), "--dst", str(out), quiet=False)
    assert result.returncode == 0, result.stderr
    layers = config["num_hidden_layers"]
    skipped = [n for n in index_of(bf16)["weight_map"] if n.startswith(f"model.layers.{layers}.")]
    assert f"config.json declares no MTP layer: {len(skipped)} tensors of layer {layers} skipped" in result.stdout
    assert not any(n.startswith(f"model.layers.{layers}.") for n in index_of(out)["weight_map"])


def test_kill_minus_nine_then_resume_gives_the_same_bytes(tmp_path):
    """bf16-fp8 on the one lifecycle: SIGKILL mid-shard, then the same command resumes; every byte as an
    uninterrupted run's, and a second twin run is refused while the first holds the destination."""
    release = tmp_path / "release"
    make_fp8_checkpoint(release, shards=6, overrides={"num_hidden_layers": 6, "n_routed_experts": 16})
    bf16 = tmp_path / "bf16"
    assert convert("fp8-bf16", "--src", str(release), "--dst", str(bf16)).returncode == 0
    reference = tmp_path / "reference"
    assert convert("bf16-fp8", "--src", str(bf16), "--dst", str(reference)).returncode == 0
    dst = tmp_path / "killed"
    args = [sys.executable, "-m", "converters.cli", "bf16-fp8", "--quiet", "--src", str(bf16), "--dst", str(dst)]
    # 0.5 MB/s: ~3 s a shard, so the twin (a fresh Python, slow on a loaded machine) meets the first run still writing
    process = subprocess.Popen([*args, "--batch-mb", "1", "--max-write-mbps", "0.5"], stderr=subprocess.PIPE, text=True)
    wait_until(lambda: list(dst.glob("model-00001-*.safetensors")), process)
    twin = subprocess.run(args, capture_output=True, text=True)
    assert twin.returncode == 2 and "being written" in twin.stderr, twin.stderr
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (dst / "model.safetensors.index.json").exists()
    resumed = subprocess.run([*args, "--json"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["shards_skipped"] >= 1
    produced = {p.name: p.read_bytes() for p in sorted(dst.iterdir()) if p.is_file() and not p.name.startswith(".")}
    assert produced == {p.name: p.read_bytes() for p in sorted(reference.iterdir()) if p.is_file() and not p.name.startswith(".")}
