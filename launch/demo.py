"""`launch demo`: the pipeline end to end on generated inputs, as the commands a user would type."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from converters.testing import deepseek_v3_config
from patcher.targets import installed_megatron_spec, resolve

# console-script name -> module, so the demo runs with this interpreter even outside the venv's PATH
_ENTRY_POINTS = {"patcher": "patcher.cli", "convert": "converters.cli", "launch": "launch.cli"}


class DemoFailure(RuntimeError):
    """A step's check did not hold."""


@dataclass
class StepResult:
    name: str
    seconds: float
    check: str


def run_command(*argv: str, expect: int = 0) -> str:
    """Echo and run one of our CLIs; return its stdout; fail if the exit code is not `expect`."""
    print(f"\n$ {' '.join(argv)}", flush=True)
    command = [sys.executable, "-m", _ENTRY_POINTS[argv[0]], *argv[1:]]
    result = subprocess.run(command, capture_output=True, text=True)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    if result.returncode != expect:
        raise DemoFailure(f"`{' '.join(argv)}` exited {result.returncode}, expected {expect}")
    return result.stdout


def step_patch_megatron(out: Path) -> str:
    """Copy the installed megatron package and patch the copy (never the installed one)."""
    package = installed_megatron_spec().parents[3]
    scratch = out / "site-packages"
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(package, scratch / "megatron", ignore=shutil.ignore_patterns("__pycache__"))
    before = resolve(scratch).detect()
    run_command("patcher", "status", str(scratch), expect=before.exit_code)
    if before.state == "needs-patch":
        run_command("patcher", "apply", "--dry-run", str(scratch))
        run_command("patcher", "apply", str(scratch))
    run_command("patcher", "status", str(scratch))
    after = resolve(scratch).detect()
    if after.state not in ("applied", "not-needed"):
        raise DemoFailure(f"Megatron copy is {after.state} after apply")
    run_command("patcher", "apply", str(scratch))  # idempotent: says nothing to do
    return f"megatron-core {after.version}: {before.state} -> {after.state}"


def step_patch_config(out: Path) -> str:
    """A sample DeepSeek-V3 config.json: drop quantization_config, disable MTP; then revert."""
    model_dir = out / "DeepSeek-V3-config"
    model_dir.mkdir(parents=True, exist_ok=True)
    original = json.dumps(deepseek_v3_config(), indent=2) + "\n"
    (model_dir / "config.json").write_text(original)
    (model_dir / "config.json.orig").unlink(missing_ok=True)
    run_command("patcher", "status", str(model_dir), expect=1)
    run_command("patcher", "apply", str(model_dir))
    run_command("patcher", "status", str(model_dir))
    patched = json.loads((model_dir / "config.json").read_text())
    if "quantization_config" in patched or patched["num_nextn_predict_layers"] != 0:
        raise DemoFailure("config.json was not patched")
    run_command("patcher", "revert", str(model_dir))
    if (model_dir / "config.json").read_text() != original:
        raise DemoFailure("revert did not restore the original bytes")
    run_command("patcher", "apply", str(model_dir))
    return "quantization_config removed, MTP off; revert byte-exact"


def step_make_fp8_model(out: Path) -> str:
    """A tiny random DeepSeek-V3 (MTP layer, ragged dims), quantised by our kernel into the FP8 layout."""
    from converters.testing import make_fp8_checkpoint

    model = out / "DeepSeek-V3-tiny-FP8"
    shutil.rmtree(model, ignore_errors=True)
    config = make_fp8_checkpoint(model, shards=3)
    shards = len(list(model.glob("*.safetensors")))
    return f"{shards} shards, {config['num_hidden_layers']} layers + MTP, hidden {config['hidden_size']}"


def step_fp8_to_bf16(out: Path) -> str:
    """convert fp8-bf16 --verify, then transformers' logits against the in-memory dequantised model."""
    import torch
    from safetensors.torch import save_file

    from converters.mcore.check import hf_logits
    from converters.testing import dequantised, load_checkpoint

    src, dst = out / "DeepSeek-V3-tiny-FP8", out / "DeepSeek-V3-tiny-BF16"
    shutil.rmtree(dst, ignore_errors=True)
    run_command("convert", "fp8-bf16", "--src", str(src), "--dst", str(dst), "--verify", "--quiet")
    run_command("convert", "fp8-bf16", "--src", str(src), "--dst", str(dst), "--quiet")  # re-run: nothing to do
    reference = out / "reference-dequantised"
    shutil.rmtree(reference, ignore_errors=True)
    reference.mkdir()
    save_file(dequantised(load_checkpoint(src)), str(reference / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(dst / "config.json", reference / "config.json")
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    difference = (hf_logits(dst, ids) - hf_logits(reference, ids)).abs().max().item()
    if difference != 0.0:
        raise DemoFailure(f"logits of the BF16 output differ from the dequantised model by {difference}")
    return "bit-exact weights; HF logits equal the dequantised model (max |diff| 0)"


def step_hf_mcore(out: Path) -> str:
    """convert hf-mcore from BF16 and straight from FP8 (same tensor files), then logits vs HF."""
    from converters.mcore.check import ATOL, compare

    bf16, fp8 = out / "DeepSeek-V3-tiny-BF16", out / "DeepSeek-V3-tiny-FP8"
    results = {}
    for name, source in (("from-bf16", bf16), ("from-fp8", fp8)):
        target = out / f"DeepSeek-V3-tiny-mcore-{name}"
        shutil.rmtree(target, ignore_errors=True)
        run_command("convert", "hf-mcore", "--src", str(source), "--dst", str(target), "--quiet")
        results[name] = target / "release"
    for path in results["from-bf16"].glob("*.distcp"):
        if path.read_bytes() != (results["from-fp8"] / path.name).read_bytes():
            raise DemoFailure(f"{path.name} differs between the BF16 and the FP8 conversion")
    difference = compare(bf16, results["from-fp8"], spec="te")
    print(f"\nMegatron-Core (TP=1, local spec reading TE names) vs transformers: max |logits diff| {difference:.2e}")
    if difference > ATOL:
        raise DemoFailure(f"Megatron-Core logits differ from HF by {difference} (tolerance {ATOL})")
    return f"FP8 and BF16 sources give identical files; mcore logits = HF within {difference:.1e}"


def step_fp8_export(out: Path) -> str:
    """convert mcore-hf --fp8 --like and bf16-fp8 --like: the FP8 release's shards come back byte for byte."""
    fp8 = out / "DeepSeek-V3-tiny-FP8"
    made = {}
    for name, argv in (("from-mcore", ("mcore-hf", "--src", str(out / "DeepSeek-V3-tiny-mcore-from-fp8"), "--hf-config", str(fp8), "--fp8")),
                       ("from-bf16", ("bf16-fp8", "--src", str(out / "DeepSeek-V3-tiny-BF16")))):
        target = out / f"DeepSeek-V3-tiny-FP8-export-{name}"
        shutil.rmtree(target, ignore_errors=True)
        run_command("convert", *argv, "--dst", str(target), "--like", str(fp8), "--quiet")
        made[name] = target
    for shard in sorted(fp8.glob("*.safetensors")):
        for name, target in made.items():
            if (target / shard.name).read_bytes() != shard.read_bytes():
                raise DemoFailure(f"{shard.name} of the FP8 export {name} differs from the release's")
    return f"both exports equal the FP8 release byte for byte ({len(list(fp8.glob('*.safetensors')))} shards)"


def step_math_data(out: Path) -> str:
    """A MATH-format sample we wrote ourselves -> verl parquet; verl's scorer accepts every answer."""
    import pyarrow.parquet as pq

    from converters.testing import math_sample_rows

    raw, data = out / "MATH-sample", out / "math-verl"
    raw.mkdir(parents=True, exist_ok=True)
    for split, rows in math_sample_rows().items():
        (raw / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    counts = json.loads(run_command("convert", "math-lighteval", "--src", str(raw), "--dst", str(data), "--json"))
    try:
        from verl.utils.reward_score import default_compute_score
    except ImportError:
        return f"{counts['train']['written']} train / {counts['test']['written']} test rows (verl not installed: scorer not run)"
    for split in ("train", "test"):
        for row in pq.read_table(data / f"{split}.parquet").to_pylist():
            truth = row["reward_model"]["ground_truth"]
            score = default_compute_score(row["data_source"], f"The answer is $\\boxed{{{truth}}}$.", truth)
            if float(score["score"] if isinstance(score, dict) else score) != 1.0:
                raise DemoFailure(f"verl scores the ground truth {truth!r} as wrong")
    skipped = counts["train"]["skipped"] + counts["test"]["skipped"]
    return f"{counts['train']['written']} train / {counts['test']['written']} test rows, {skipped} skipped; verl scores all 1.0"


def step_plan_and_preflight(out: Path) -> str:
    """The 16-node plan for the real model, then `launch grpo --dry-run` on the demo model."""
    run_command("launch", "plan", "--model", "deepseek-v3", "--nodes", "16", "--recipe", "pai-16x8", "--gpu-mem-gb", "96")
    model = out / "DeepSeek-V3-tiny-BF16"
    run_command("patcher", "apply", str(model))  # num_nextn_predict_layers: 0, as the seed recipe does
    report = json.loads(run_command(
        "launch", "grpo", "--nodes", "16", "--model", str(model), "--mcore-ckpt", str(out / "DeepSeek-V3-tiny-mcore-from-fp8"),
        "--data", str(out / "math-verl"), "--dry-run", "--json",
    ))
    failed = [check["name"] for check in report["preflight"] if not check["ok"]]
    if failed:
        raise DemoFailure(f"preflight failed: {', '.join(failed)}")
    return f"pai-16x8 plan printed; dry run: {len(report['preflight'])} preflight checks pass, {len(report['command'])} argv items"


STEPS: list[tuple[str, Callable[[Path], str]]] = [
    ("patch Megatron (scratch copy)", step_patch_megatron),
    ("patch config.json", step_patch_config),
    ("generate tiny FP8 DeepSeek-V3", step_make_fp8_model),
    ("convert fp8-bf16", step_fp8_to_bf16),
    ("convert hf-mcore (BF16 and FP8)", step_hf_mcore),
    ("export FP8 to serve (mcore-hf, bf16-fp8)", step_fp8_export),
    ("convert math-lighteval (sample)", step_math_data),
    ("launch plan + grpo --dry-run", step_plan_and_preflight),
]


def run_demo(out: Path) -> list[StepResult]:
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name, step in STEPS:
        print(f"\n=== {name} ===", flush=True)
        start = time.perf_counter()
        check = step(out)
        results.append(StepResult(name, time.perf_counter() - start, check))
    return results


def format_table(results: list[StepResult]) -> str:
    width = max(len(result.name) for result in results)
    lines = [f"{'step':<{width}}  {'time':>7}  check", f"{'-' * width}  {'-' * 7}  {'-' * 40}"]
    lines += [f"{r.name:<{width}}  {r.seconds:>6.1f}s  {r.check}" for r in results]
    return "\n".join(lines)


def demo_command(out: Path) -> int:
    """`launch demo`: 0 when every step's check passed, 1 at the first that failed."""
    try:
        results = run_demo(out)
    except DemoFailure as exc:
        print(f"launch demo: FAILED: {exc}", file=sys.stderr)
        return 1
    print("\n" + format_table(results))
    return 0
