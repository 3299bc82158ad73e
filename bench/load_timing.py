"""Timed real loads on GPUs: the same checkpoint in the global and the TP-aligned layout, bytes read per rank.

    python -m bench.load_timing --work /tmp/load-timing --json > load_timing.json

What it does, on one machine with 2 GPUs (NCCL, 2 processes, TP2; megatron-core 0.16.1, Transformer
Engine optional):
1. writes a BF16 HF checkpoint with DeepSeek-V3's widths (hidden 7168, vocab 129280, MLA dims as
   released), `--layers` decoder layers (the first dense, the rest MoE with `--experts` routed
   experts of 2048) and random weights, with no transformers or safetensors package needed;
2. converts it twice with `convert hf-mcore`: the default global layout and `--align-tp 2`;
3. for `--repeats` rounds, alternating layouts: drops the checkpoint's pages from the page cache
   (`posix_fadvise(DONTNEED)` after `sync`; `--warm` keeps them), then each rank builds the model
   (TE spec when Transformer Engine imports, else the local spec with the TE names mapped on) and
   times megatron-core's `dist_checkpointing.load` as verl calls it, counting the bytes its reader
   pulls from the `.distcp` files (bench.load_reads.counting_reads);
4. checks that both layouts load the same values (a float64 sum per parameter, per rank) and that
   each rank's slices of the embedding and of layer 0's `linear_proj` equal the HF tensors'.

`_extra_state` objects the model asks for and the checkpoint lacks (TE norms, depending on the TE
version) are left out of the request and counted in the output; they hold no weights.
Output: a table, or with `--json` one JSON object: machine, versions, sizes, and per layout the load
seconds of every round and each rank's bytes (read through its streams, as whole records, needed).
Exit codes: 0 done and the values check out, 1 values differ, 2 cannot run here (no 2 GPUs, no
megatron-core). `--cpu-check` rehearses the whole run on CPU (gloo, tiny model) without timing anything.
Run from the repository root (`PYTHONPATH=.` if the toolkit is not installed); with packages in a
separate directory: `PYTHONPATH=.:/tmp/site python -m bench.load_timing ...`. Cut short (a time limit)?
Run the same command again: the HF checkpoint and finished conversions in `--work` are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

LAYOUTS = {"global": (), "aligned": ("--align-tp", "2")}
TP = 2


def model_config(layers: int, experts: int, tiny: bool = False) -> dict:
    from converters.testing import TINY_DEEPSEEK_V3, deepseek_v3_config

    config = deepseek_v3_config()
    config.pop("quantization_config")
    if tiny:
        config.update(TINY_DEEPSEEK_V3)
    config.update(num_hidden_layers=layers, first_k_dense_replace=1, n_routed_experts=experts, num_nextn_predict_layers=0,
                  n_group=min(config["n_group"], experts), topk_group=min(config["topk_group"], experts),
                  num_experts_per_tok=min(config["num_experts_per_tok"], experts))
    return config


def write_hf_checkpoint(dst: Path, config: dict, shard_bytes: int = 2 * 10**9) -> int:
    """Random BF16 weights (float32 expert bias) in safetensors shards with an index; returns bytes."""
    from converters.hf.safetensors_io import DTYPE_NAMES, OutputTensor, encode_header, order_for_writing, tensor_bytes
    from converters.mcore.params import hf_tensor_shapes
    from toolkit.safetensors_index import INDEX_NAME

    dst.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    shapes = hf_tensor_shapes(config, 0)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    for index, names in enumerate(groups):
        tensors = {}
        for name in names:
            if name.endswith("e_score_correction_bias"):
                tensors[name] = torch.rand(shapes[name], generator=generator, dtype=torch.float32) * 0.1
            elif name.endswith("norm.weight"):
                tensors[name] = (1 + 0.1 * torch.randn(shapes[name], generator=generator)).to(torch.bfloat16)
            else:
                tensors[name] = (0.02 * torch.randn(shapes[name], generator=generator)).to(torch.bfloat16)
        listed = order_for_writing([OutputTensor(n, DTYPE_NAMES[t.dtype], tuple(t.shape)) for n, t in tensors.items()])
        shard = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        with open(dst / shard, "wb") as handle:
            handle.write(encode_header(listed))
            for entry in listed:
                handle.write(tensor_bytes(tensors[entry.name]))
                total += entry.nbytes
        weight_map.update(dict.fromkeys(names, shard))
    (dst / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return total


def convert(src: Path, dst: Path, extra: tuple[str, ...]) -> float:
    from converters.mcore.from_hf import McoreOptions, plan_conversion, run_conversion

    start = time.perf_counter()
    options = McoreOptions(overwrite=True, align_tp=int(extra[1]) if extra else None)
    summary = run_conversion(plan_conversion(src, dst, options))
    if not summary.finalized:
        raise RuntimeError(f"conversion to {dst} did not finish")
    return time.perf_counter() - start


def drop_page_cache(release: Path) -> None:
    os.sync()
    for path in release.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _without_missing_objects(sharded, present: set[str]) -> tuple[object, int]:
    """The request without the ShardedObjects the checkpoint does not hold, and how many were left out."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    dropped = 0

    def walk(value):
        nonlocal dropped
        if isinstance(value, dict):
            kept = {}
            for key, item in value.items():
                if isinstance(item, ShardedObject) and item.unique_key not in present:
                    dropped += 1
                    continue
                kept[key] = walk(item)
            return kept
        if isinstance(value, list):
            kept_list = []
            for item in value:
                if isinstance(item, ShardedObject) and item.unique_key not in present:
                    dropped += 1
                    continue
                kept_list.append(walk(item))
            return kept_list
        return value

    return walk(sharded), dropped


def build_model(config: dict, use_te: bool, cpu: bool = False):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    from converters.mcore.config import gpt_model_kwargs, mcore_config_kwargs
    from converters.mcore.params import te_keys_map
    from converters.mcore.shim import local_core_attention

    kwargs = mcore_config_kwargs(config)
    if cpu:  # the --cpu-check rehearsal: what converters.mcore.check runs (TP in eval mode, no sequence parallel)
        kwargs.update(moe_token_dispatcher_type="allgather", params_dtype=torch.float32, use_cpu_initialization=True)
    else:
        kwargs.update(sequence_parallel=True, params_dtype=torch.bfloat16, bf16=True)
    transformer_config = MLATransformerConfig(
        **kwargs, tensor_model_parallel_size=TP, attention_dropout=0.0, hidden_dropout=0.0, perform_initialization=False,
    )
    block = get_gpt_decoder_block_spec(transformer_config, use_transformer_engine=use_te)
    if not use_te:
        for layer_spec in block.layer_specs:
            layer_spec.submodules.self_attention.submodules.core_attention = local_core_attention()
            dense = not hasattr(layer_spec.submodules.mlp.submodules, "experts")
            layer_spec.submodules.sharded_state_dict_keys_map = te_keys_map(dense)
    return GPTModel(config=transformer_config, transformer_layer_spec=block, pre_process=parallel_state.is_pipeline_first_stage(),
                    post_process=parallel_state.is_pipeline_last_stage(), **gpt_model_kwargs(config))


def _rank_main(rank: int, port: int, work: str, rounds: list[str], warm: bool, result: str, cpu: bool) -> None:
    import dataclasses

    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from torch.distributed.checkpoint import FileSystemReader

    from bench.load_reads import counting_reads

    if cpu:
        from converters.mcore.shim import install_cpu_shim
        from converters.mcore.world import init_distributed

        install_cpu_shim()
        init_distributed(rank, TP, port, tp=TP)
        use_te, device = False, "cpu"
    else:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.cuda.set_device(rank)
        torch.distributed.init_process_group("nccl", rank=rank, world_size=TP, device_id=torch.device("cuda", rank))
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=TP)
        model_parallel_cuda_manual_seed(1234)
        use_te, device = _have_te(), "cuda"
    config = json.loads((Path(work) / "hf" / "config.json").read_text())
    model = build_model(config, use_te, cpu)
    metadata = {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    records, sums = [], {}
    for name in rounds:
        release = Path(work) / name / "release"
        present = set(FileSystemReader(str(release)).read_metadata().state_dict_metadata)
        if not warm:
            drop_page_cache(release)
        sharded, dropped = _without_missing_objects(model.sharded_state_dict(metadata=metadata), present)
        torch.cuda.synchronize()
        torch.distributed.barrier()
        start = time.perf_counter()
        with counting_reads() as count:
            state = dist_checkpointing.load(sharded, str(release), strict=StrictHandling.ASSUME_OK_UNEXPECTED)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        torch.distributed.barrier()
        slowest = torch.tensor([seconds], device=device)
        torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
        model.load_state_dict({k: v for k, v in state.items() if k not in ("checkpoint_version", "iteration")}, strict=False)
        sums.setdefault(name, {k: float(p.double().sum()) for k, p in model.state_dict().items() if torch.is_tensor(p) and p.is_floating_point()})
        records.append({"layout": name, "seconds": seconds, "slowest_rank_seconds": slowest.item(), "objects_left_out": dropped,
                        "matches_source": _matches_source(model, Path(work) / "hf", rank), **dataclasses.asdict(count)})
        del state
    Path(f"{result}.{rank}").write_text(json.dumps({"rank": rank, "te": use_te, "records": records, "sums": sums}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _matches_source(model, hf: Path, rank: int) -> bool:
    """This rank's slice of a vocab-parallel and of a row-parallel weight equals the HF tensor's."""
    from converters.hf.checkpoint import HFCheckpoint

    source = HFCheckpoint(hf)
    state = model.state_dict()
    checks = (("embedding.word_embeddings.weight", "model.embed_tokens.weight", 0),
              ("decoder.layers.0.self_attention.linear_proj.weight", "model.layers.0.self_attn.o_proj.weight", 1))
    for key, name, axis in checks:
        whole = source.read(name).float()
        width = whole.shape[axis] // TP
        expected = whole.narrow(axis, rank * width, width)
        if not torch.equal(state[key].detach().float().cpu(), expected):
            return False
    return True


def _have_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _versions() -> dict:
    versions = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for module in ("megatron.core", "transformer_engine"):
        try:
            imported = __import__(module, fromlist=["__version__"])
            versions[module] = getattr(imported, "__version__", "?")
        except ImportError:
            versions[module] = None
    return versions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "load-timing")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers: the first dense, the rest MoE (default 2)")
    parser.add_argument("--experts", type=int, default=16, help="routed experts per MoE layer (default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per layout (default 3)")
    parser.add_argument("--warm", action="store_true", help="keep the page cache between loads")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--cpu-check", action="store_true",
                        help="rehearse the whole run on CPU (gloo, tiny model) to check this script, not to time anything")
    args = parser.parse_args(argv)
    if not args.cpu_check and (not torch.cuda.is_available() or torch.cuda.device_count() < TP):
        print(f"load_timing: needs {TP} CUDA GPUs, found {torch.cuda.device_count() if torch.cuda.is_available() else 0}", file=sys.stderr)
        return 2
    try:
        import megatron.core  # noqa: F401
    except ImportError:
        print("load_timing: megatron-core is not importable (add its directory to PYTHONPATH)", file=sys.stderr)
        return 2
    work = args.work
    config = model_config(args.layers, args.experts, tiny=args.cpu_check)
    hf = work / "hf"
    marker = work / "hf.json"
    wanted = json.dumps(config, sort_keys=True)
    if not marker.is_file() or marker.read_text() != wanted:
        hf_bytes = write_hf_checkpoint(hf, config)
        marker.write_text(wanted)
    else:
        hf_bytes = sum(p.stat().st_size for p in hf.glob("*.safetensors"))
    conversions = {name: round(convert(hf, work / name, extra), 2) for name, extra in LAYOUTS.items()}
    rounds = [name for _ in range(args.repeats) for name in LAYOUTS]
    with tempfile.TemporaryDirectory() as scratch:
        result = os.path.join(scratch, "rank")
        torch.multiprocessing.start_processes(_rank_main, args=(_free_port(), str(work), rounds, args.warm, result, args.cpu_check),
                                              nprocs=TP, start_method="spawn", join=True)
        ranks = [json.loads(Path(f"{result}.{rank}").read_text()) for rank in range(TP)]
    same = all(rank["sums"]["global"] == rank["sums"]["aligned"] for rank in ranks)
    same = same and all(record["matches_source"] for rank in ranks for record in rank["records"])
    report = {
        "machine": "cpu (--cpu-check)" if args.cpu_check else torch.cuda.get_device_name(0), "gpus": 0 if args.cpu_check else TP, "versions": _versions(), "spec": "te" if ranks[0]["te"] else "local",
        "model": {"layers": args.layers, "experts": args.experts, "hf_bytes": hf_bytes}, "cache": "warm" if args.warm else "dropped (fadvise)",
        "conversion_seconds": conversions, "same_values": same, "layouts": {},
    }
    for name in LAYOUTS:
        runs = [[r for r in rank["records"] if r["layout"] == name] for rank in ranks]
        report["layouts"][name] = {
            "load_seconds": [round(r["slowest_rank_seconds"], 3) for r in runs[0]],
            "per_rank": [{key: runs[rank][0][key] for key in ("stream_tensor_bytes", "stream_object_bytes", "record_bytes", "needed_bytes",
                                                              "objects_left_out")} for rank in range(TP)],
        }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['machine']} x{TP}, spec {report['spec']}, {hf_bytes / 1e9:.2f} GB model, cache {report['cache']}")
        for name, entry in report["layouts"].items():
            read = [r["stream_tensor_bytes"] / 1e9 for r in entry["per_rank"]]
            needed = [r["needed_bytes"] / 1e9 for r in entry["per_rank"]]
            print(f"  {name:8s} load s {entry['load_seconds']}  read GB per rank {[round(x, 2) for x in read]}"
                  f"  needed {[round(x, 2) for x in needed]}")
        print("  same values in both layouts: " + ("yes" if same else "NO"))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
