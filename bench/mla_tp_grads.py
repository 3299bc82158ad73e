"""TP=2 against TP=1 gradients of a tiny DeepSeek-V3-style MLA GPTModel, and the flag-based export shapes.

Uses whatever `megatron` is first on sys.path (put a patched copy first to test a patch). One
forward/backward of the same weights and tokens runs at TP=1 (one process) and at TP=2 (two); TP=2
grads of sequence-parallel parameters are then summed over TP as Megatron's `finalize_model_grads`
does, gathered to full shape, and compared per parameter: max |g_tp2 - g_tp1| / max |g_tp1|.

Export: every TP=2 parameter is gathered the way verl's per-tensor generator does it, by its
`tensor_model_parallel` flag along `partition_dim`; the q/kv down projections must come out with the
HF shapes [q_lora_rank, hidden] and [kv_lora_rank + qk_rope_head_dim, hidden].

Backends:
  local  CPU, gloo, megatron's local spec (column-parallel down projections in 0.16.1), dense MLA,
         sequence parallel off. Runs in CI.
  te     CUDA, NCCL, Transformer Engine spec (get_gpt_decoder_block_spec(use_transformer_engine=True)),
         sequence parallel on at TP=2, fp32 params, TF32 off. Two GPUs.

    python -m bench.mla_tp_grads --backend local --json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

DOWN_PROJECTIONS = ("linear_q_down_proj", "linear_kv_down_proj")
NCCL_ENVIRONMENT = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
    "NVIDIA_TF32_OVERRIDE": "0",  # cuBLAS calls that torch's allow_tf32 switches do not reach
}


@dataclass(frozen=True)
class TinyMLA:
    """DeepSeek-V3's attention shape at toy size: q/kv LoRA, a shared RoPE key, yarn RoPE, RMSNorm."""

    layers: int = 2
    hidden: int = 64
    heads: int = 4
    q_lora_rank: int = 48
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32  # = qk_nope + qk_rope: one head dim for q, k and v keeps TE's fp32 attention on its plain path
    ffn_hidden: int = 128
    vocab: int = 128
    sequence: int = 16
    batch: int = 2
    seed: int = 1234

    @property
    def hf_down_shapes(self) -> dict[str, list[int]]:
        return {
            "linear_q_down_proj": [self.q_lora_rank, self.hidden],
            "linear_kv_down_proj": [self.kv_lora_rank + self.qk_rope_head_dim, self.hidden],
        }


class BenchFailure(RuntimeError):
    """A phase failed; the message says which and why (the traceback is in the report)."""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def build_config(tiny: TinyMLA, backend: str, tp: int):
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    return MLATransformerConfig(
        num_layers=tiny.layers,
        hidden_size=tiny.hidden,
        ffn_hidden_size=tiny.ffn_hidden,
        num_attention_heads=tiny.heads,
        kv_channels=tiny.v_head_dim,
        q_lora_rank=tiny.q_lora_rank,
        kv_lora_rank=tiny.kv_lora_rank,
        qk_head_dim=tiny.qk_nope_head_dim,
        qk_pos_emb_head_dim=tiny.qk_rope_head_dim,
        v_head_dim=tiny.v_head_dim,
        multi_latent_attention=True,
        qk_layernorm=True,
        normalization="RMSNorm",
        # one weight matrix per projection: a gated fc1 is interleaved per TP rank, which would need
        # its own gather rule and says nothing about attention
        gated_linear_unit=False,
        add_bias_linear=False,
        add_qkv_bias=False,
        rope_type="yarn",
        rotary_base=10000,
        rotary_scaling_factor=40.0,
        original_max_position_embeddings=4096,
        mscale=1.0,
        mscale_all_dim=1.0,
        tensor_model_parallel_size=tp,
        sequence_parallel=backend == "te" and tp > 1,  # verl forces it at TP > 1; the local spec cannot
        params_dtype=torch.float32,
        use_cpu_initialization=backend == "local",
        attention_dropout=0.0,
        hidden_dropout=0.0,
        persist_layer_norm=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
    )


def build_model(tiny: TinyMLA, backend: str, tp: int):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    config = build_config(tiny, backend, tp)
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=backend == "te")
    if backend == "local":
        from converters.mcore.shim import local_core_attention

        for layer_spec in block.layer_specs:
            layer_spec.submodules.self_attention.submodules.core_attention = local_core_attention()
    model = GPTModel(
        config=config,
        transformer_layer_spec=block,
        vocab_size=tiny.vocab,
        max_sequence_length=tiny.sequence,
        position_embedding_type="none",  # MLA applies its own rotary embedding
        share_embeddings_and_output_weights=False,
    )
    if backend == "te":
        model.cuda(torch.cuda.current_device())
    return config, model


def inputs(tiny: TinyMLA, device: torch.device) -> dict[str, torch.Tensor | None]:
    generator = torch.Generator().manual_seed(tiny.seed + 1)
    ids = torch.randint(0, tiny.vocab, (tiny.batch, tiny.sequence + 1), generator=generator)
    positions = torch.arange(tiny.sequence).unsqueeze(0).expand(tiny.batch, -1)
    mask = torch.triu(torch.ones(tiny.sequence, tiny.sequence, dtype=torch.bool), diagonal=1)[None, None]
    return {
        "input_ids": ids[:, :-1].to(device),
        "labels": ids[:, 1:].to(device),
        "position_ids": positions.to(device),
        "attention_mask": mask.to(device),
    }


def split_dim(local: tuple[int, ...], full: tuple[int, ...], tp: int, name: str) -> int | None:
    """The one dim a TP shard is cut along (None: replicated), from the shapes alone."""
    if len(local) != len(full):
        raise BenchFailure(f"{name}: local shape {list(local)} and full shape {list(full)} differ in rank")
    differ = [d for d, (a, b) in enumerate(zip(local, full, strict=True)) if a != b]
    if len(differ) > 1 or (differ and local[differ[0]] * tp != full[differ[0]]):
        raise BenchFailure(f"{name}: local shape {list(local)} is not a 1/{tp} shard of {list(full)}")
    return differ[0] if differ else None


def gather_along(tensor: torch.Tensor, dim: int | None, group) -> torch.Tensor:
    """Concatenate every TP rank's tensor along `dim` (None: this rank's own)."""
    if dim is None:
        return tensor.detach().clone()
    parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, tensor.detach().contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def reduce_sequence_parallel_grads(model, config, group) -> list[str]:
    """What `finalize_model_grads` does for sequence parallelism: sum over TP every grad of a param
    marked `sequence_parallel` (layernorms, and duplicated linears such as TE's down projections)."""
    reduced = []
    if not config.sequence_parallel:
        return reduced
    for name, param in model.named_parameters():
        if param.grad is not None and getattr(param, "sequence_parallel", False):
            torch.distributed.all_reduce(param.grad, group=group)
            reduced.append(name)
    return reduced


def flag_based_export(model, group) -> dict[str, list[int]]:
    """Each parameter's exported shape when gathered by `tensor_model_parallel` / `partition_dim`
    (verl's per-tensor generator; mbridge <= 0.15.1 does the same)."""
    shapes = {}
    for name, param in model.named_parameters():
        dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
        shapes[name] = list(gather_along(param.data, dim, group).shape)
    return shapes


def _layer_classes(model) -> dict[str, str]:
    attention = model.decoder.layers[0].self_attention
    return {name: type(getattr(attention, name)).__name__ for name in DOWN_PROJECTIONS}


def _patch_markers() -> dict[str, Any]:
    """Which megatron was imported and whether `patcher`'s changes are in it (read from its files)."""
    import megatron.core

    root = Path(megatron.core.__file__).parent
    version = None
    try:
        from megatron.core.package_info import __version__ as version
    except ImportError:
        pass
    mla = (root / "transformer/multi_latent_attention.py").read_text()
    te = root / "extensions/transformer_engine.py"
    te_text = te.read_text() if te.is_file() else ""
    return {
        "megatron_core": version,
        "path": str(root),
        "rope_gradient_fix": "k_pos_emb = copy_to_tensor_model_parallel_region(k_pos_emb" in mla,
        "export_flag": 'setattr(param, "tensor_model_parallel", False)' in te_text
        or "setattr(param, 'tensor_model_parallel', False)" in te_text,
    }


def _setup(rank: int, world: int, port: int, backend: str, tp: int) -> torch.device:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "local":
        from converters.mcore.shim import install_cpu_shim

        install_cpu_shim()
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(minutes=5))
        device = torch.device("cpu")
    else:
        os.environ.update(NCCL_ENVIRONMENT)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        torch.distributed.init_process_group(
            "nccl", rank=rank, world_size=world, timeout=timedelta(minutes=5), device_id=device
        )
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    if backend == "local":
        model_parallel_cuda_manual_seed(1234, inference_rng_tracker=True, force_reset_rng=True)
    else:
        model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    return device


def _step(model, batch: dict[str, torch.Tensor | None], backend: str) -> float:
    # TE's attention takes its causal mask from the layer's mask type; the local one needs it given
    mask = batch["attention_mask"] if backend == "local" else None
    loss = model(batch["input_ids"], batch["position_ids"], mask, labels=batch["labels"])
    total = loss.float().sum()
    total.backward()
    return total.item()


def _worker(rank: int, world: int, port: int, backend: str, tiny_fields: dict, scratch: str) -> None:
    """One TP rank: build, (TP=2: load the TP=1 weights), one step, reduce, gather, save on rank 0."""
    tiny = TinyMLA(**tiny_fields)
    tp = world
    phase = f"tp{tp}"
    try:
        from megatron.core import parallel_state

        device = _setup(rank, world, port, backend, tp)
        config, model = build_model(tiny, backend, tp)
        group = parallel_state.get_tensor_model_parallel_group()
        if tp > 1:
            reference = torch.load(Path(scratch) / "tp1.pt", map_location="cpu")
            with torch.no_grad():
                for name, param in model.named_parameters():
                    full = reference["params"][name]
                    dim = split_dim(tuple(param.shape), tuple(full.shape), tp, name)
                    part = full if dim is None else full.chunk(tp, dim=dim)[rank]
                    param.copy_(part.to(param.device))
        loss = _step(model, inputs(tiny, device), backend)
        reduced = reduce_sequence_parallel_grads(model, config, group)
        params, grads, spread = {}, {}, {}
        reference_shapes = torch.load(Path(scratch) / "tp1.pt", map_location="cpu")["shapes"] if tp > 1 else None
        for name, param in model.named_parameters():
            full_shape = reference_shapes[name] if reference_shapes else tuple(param.shape)
            dim = split_dim(tuple(param.shape), tuple(full_shape), tp, name)
            if param.grad is None:
                raise BenchFailure(f"{name}: no gradient after backward")
            grads[name] = gather_along(param.grad, dim, group).cpu()
            params[name] = gather_along(param.data, dim, group).cpu()
            if dim is None and tp > 1:
                # a replicated parameter's grad must agree across TP ranks after the reduction
                copies = gather_along(param.grad, 0, group).chunk(tp, dim=0)
                spread[name] = max((copy - copies[0]).abs().max().item() for copy in copies)
        export = flag_based_export(model, group) if tp > 1 else {}
        if rank == 0:
            result = {
                "loss": loss,
                "params": params,
                "grads": grads,
                "shapes": {name: tuple(t.shape) for name, t in params.items()},
                "flags": {
                    name: [bool(getattr(p, "tensor_model_parallel", False)), getattr(p, "partition_dim", None), bool(getattr(p, "sequence_parallel", False))]
                    for name, p in model.named_parameters()
                },
                "sequence_parallel": bool(config.sequence_parallel),
                "reduced": reduced,
                "spread": spread,
                "export": export,
                "layers": _layer_classes(model),
                "markers": _patch_markers(),
            }
            torch.save(result, Path(scratch) / f"{phase}.pt")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except BaseException:
        (Path(scratch) / f"{phase}.rank{rank}.err").write_text(traceback.format_exc())
        raise


def _run_phase(world: int, backend: str, tiny: TinyMLA, scratch: Path, timeout_s: float) -> None:
    """Spawn `world` ranks (a fresh process each: the CPU shim patches torch.cuda) and wait."""
    if backend == "te":
        os.environ.update(NCCL_ENVIRONMENT)
        if torch.cuda.device_count() < world:
            raise BenchFailure(f"tp{world}: needs {world} GPUs, this machine has {torch.cuda.device_count()}")
    context = torch.multiprocessing.start_processes(
        _worker, args=(world, _free_port(), backend, asdict(tiny), str(scratch)), nprocs=world, start_method="spawn", join=False
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.terminate()
                raise BenchFailure(f"tp{world}: no result after {timeout_s:.0f} s; ranks terminated")
    except torch.multiprocessing.ProcessRaisedException as exc:
        errors = sorted(scratch.glob(f"tp{world}.rank*.err"))
        detail = errors[0].read_text() if errors else str(exc)
        raise BenchFailure(f"tp{world} failed:\n{detail}") from None
    except torch.multiprocessing.ProcessExitedException as exc:
        raise BenchFailure(f"tp{world}: a rank exited with {exc.exit_code} (signal {exc.signal_name}) and left no traceback") from None


def rel_max_diff(ours: torch.Tensor, reference: torch.Tensor) -> float:
    scale = reference.abs().max().item()
    return (ours - reference).abs().max().item() / scale if scale else float((ours - reference).abs().max().item())


def compare(tp1: dict, tp2: dict, tiny: TinyMLA) -> dict[str, Any]:
    """Per-parameter relative max grad difference, its maximum per kind, and the export check."""
    grads = {}
    for name, reference in tp1["grads"].items():
        ours = tp2["grads"][name]
        grads[name] = {"rel_max_diff": rel_max_diff(ours, reference), "shape": list(reference.shape)}
    by_kind: dict[str, float] = {}
    for name, entry in grads.items():
        kind = name.split(".")[-2] if name.startswith("decoder.layers.") else name.rsplit(".", 1)[0]
        by_kind[kind] = max(by_kind.get(kind, 0.0), entry["rel_max_diff"])
    export = {}
    for name, shape in tp2["export"].items():
        proj = name.split(".")[-2]
        if proj in DOWN_PROJECTIONS and name.endswith(".weight"):
            expected = tiny.hf_down_shapes[proj]
            export[name] = {"shape": shape, "hf_shape": expected, "ok": shape == expected, "tensor_model_parallel": tp2["flags"][name][0]}
    mismatched = {name: shape for name, shape in tp2["export"].items() if shape != list(tp1["shapes"][name])}
    return {
        "loss": {"tp1": tp1["loss"], "tp2": tp2["loss"], "rel_diff": abs(tp2["loss"] - tp1["loss"]) / abs(tp1["loss"])},
        "max_rel_diff": dict(sorted(by_kind.items())),
        "max_rel_diff_all": max(entry["rel_max_diff"] for entry in grads.values()),
        "grads": grads,
        "replicated_grad_spread": max(tp2["spread"].values(), default=0.0),
        "export_down_proj": export,
        "export_ok": all(entry["ok"] for entry in export.values()) and bool(export),
        "export_mismatched": mismatched,
    }


def run(backend: str = "local", tiny: TinyMLA | None = None, timeout_s: float = 600.0) -> dict[str, Any]:
    """Both phases and the comparison; every failure is recorded in `errors`, never raised."""
    tiny = tiny or TinyMLA()
    report: dict[str, Any] = {"backend": backend, "model": asdict(tiny), "errors": [], "torch": torch.__version__}
    try:
        from importlib.metadata import PackageNotFoundError, version

        try:
            report["transformer_engine"] = version("transformer_engine")
        except PackageNotFoundError:
            report["transformer_engine"] = None
    except ImportError:
        pass
    with tempfile.TemporaryDirectory(prefix="mla_tp_grads.") as scratch_dir:
        scratch = Path(scratch_dir)
        results = {}
        for world in (1, 2):
            try:
                _run_phase(world, backend, tiny, scratch, timeout_s)
                results[world] = torch.load(scratch / f"tp{world}.pt", map_location="cpu")
            except BenchFailure as exc:
                report["errors"].append(str(exc))
                break
            except Exception as exc:  # noqa: BLE001 - the report must still come out
                report["errors"].append(f"tp{world}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
                break
        for world, result in results.items():
            report[f"tp{world}"] = {
                "loss": result["loss"],
                "layers": result["layers"],
                "sequence_parallel": result["sequence_parallel"],
                "sequence_parallel_reduced": len(result["reduced"]),
            }
            report["megatron"] = result["markers"]
        if 1 in results and 2 in results:
            try:
                report.update(compare(results[1], results[2], tiny))
                report["flags_tp2"] = {
                    name: dict(zip(("tensor_model_parallel", "partition_dim", "sequence_parallel"), flags, strict=True))
                    for name, flags in results[2]["flags"].items()
                    if name.split(".")[-2] in DOWN_PROJECTIONS
                }
            except Exception as exc:  # noqa: BLE001
                report["errors"].append(f"compare: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    report["ok"] = not report["errors"]
    return report


def print_report(report: dict[str, Any]) -> None:
    markers = report.get("megatron", {})
    print(f"backend {report['backend']}: megatron-core {markers.get('megatron_core')} at {markers.get('path')}")
    print(f"  rope-gradient fix in it: {markers.get('rope_gradient_fix')}, export flag: {markers.get('export_flag')}")
    if "tp2" in report:
        print(f"  down projections at TP=2: {report['tp2']['layers']}, sequence parallel {report['tp2']['sequence_parallel']}")
    if "loss" in report:
        print(f"  loss TP1 {report['loss']['tp1']:.6f}  TP2 {report['loss']['tp2']:.6f}  rel diff {report['loss']['rel_diff']:.2e}")
        print("  max relative grad difference (TP2 vs TP1):")
        for kind, value in report["max_rel_diff"].items():
            print(f"    {kind:<40} {value:.2e}")
        print("  flag-based export of the down projections:")
        for name, entry in report["export_down_proj"].items():
            print(f"    {name:<60} {entry['shape']} (HF {entry['hf_shape']}) {'ok' if entry['ok'] else 'WRONG'}")
    for error in report["errors"]:
        print(f"  ERROR: {error}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.mla_tp_grads",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes: 0 both phases ran and were compared, 1 a phase failed (the JSON says which), 2 bad arguments",
    )
    parser.add_argument("--backend", choices=("local", "te"), default="local")
    parser.add_argument("--json", action="store_true", help="print one JSON object (per-parameter figures included)")
    parser.add_argument("--out", type=Path, help="also write the JSON report to this file")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per phase before its ranks are terminated")
    args = parser.parse_args(argv)
    report = run(args.backend, timeout_s=args.timeout)
    text = json.dumps(report, indent=2, default=str)
    if args.out:
        args.out.write_text(text + "\n")
    if args.json:
        print(text)
    else:
        print_report(report)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
