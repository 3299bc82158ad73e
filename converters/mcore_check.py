"""Load a converted torch_dist checkpoint into a real Megatron-Core GPTModel on CPU and compare logits.

This is how a user (and our tests and demo) proves a conversion: the model is built from
config.json with the config table, the checkpoint is loaded with verl's exact call
(`dist_checkpointing.load(model.sharded_state_dict(), path, strict=ASSUME_OK_UNEXPECTED)`), and the
logits are compared with the HF model's in float32. Parallel layouts run as gloo processes on
127.0.0.1 (TP in eval mode; EP; PP with the hidden state handed from stage to stage).

    python -m converters.mcore_check --hf HF_DIR --mcore MCORE_DIR [--tp 2] [--ep 2] [--pp 2] [--spec te]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import torch

# Logits are compared in float32; the two implementations order their reductions differently.
ATOL = 1e-4
SEQUENCE = 13
BATCH = 2


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def te_keys_map(dense: bool) -> dict[str, str]:
    """Local-spec module names -> the TE spec's fused names (Megatron's sharded_state_dict_keys_map)."""
    mapping = {
        "self_attention.q_layernorm.": "self_attention.linear_q_up_proj.layer_norm_",
        "self_attention.kv_layernorm.": "self_attention.linear_kv_up_proj.layer_norm_",
    }
    if dense:
        mapping["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
    return mapping


def build_model(config: dict, tp: int, pp: int, ep: int, spec: str):
    """A float32 GPTModel with the local spec (TE names mapped on if spec == 'te') for this rank's stage."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    from converters.mcore_config import gpt_model_kwargs, mcore_config_kwargs
    from converters.mcore_shim import local_core_attention

    kwargs = mcore_config_kwargs(config)
    kwargs["moe_token_dispatcher_type"] = "allgather"  # the alltoall dispatcher needs CUDA
    if pp > 1:
        kwargs["pipeline_dtype"] = torch.float32
        layers = config["num_hidden_layers"]
        if layers % pp:  # uneven split: the first stage takes the remainder
            kwargs["num_layers_in_first_pipeline_stage"] = layers - layers // pp * (pp - 1)
    transformer_config = MLATransformerConfig(
        **kwargs,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        params_dtype=torch.float32,
        use_cpu_initialization=True,
        attention_dropout=0.0,
        hidden_dropout=0.0,
    )
    block = get_gpt_decoder_block_spec(transformer_config, use_transformer_engine=False)
    for layer_spec in block.layer_specs:
        layer_spec.submodules.self_attention.submodules.core_attention = local_core_attention()
        if spec == "te":
            dense = not hasattr(layer_spec.submodules.mlp.submodules, "experts")
            layer_spec.submodules.sharded_state_dict_keys_map = te_keys_map(dense)
    mtp = None
    if transformer_config.mtp_num_layers:
        mtp = get_gpt_mtp_block_spec(transformer_config, block.layer_specs[-1], use_transformer_engine=False)
    return GPTModel(
        config=transformer_config,
        transformer_layer_spec=block,
        mtp_block_spec=mtp,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=False,
        **gpt_model_kwargs(config),
    )


def _rank_main(rank: int, world: int, port: int, hf_dir: str, mcore_dir: str, tp: int, pp: int, ep: int, spec: str, result: str) -> None:
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from converters.mcore_shim import init_distributed, install_cpu_shim

    install_cpu_shim()
    init_distributed(rank, world, port, tp=tp, pp=pp, ep=ep)
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    model = build_model(config, tp, pp, ep, spec)
    model.eval()
    # verl's exact call: a key the model asks for and the checkpoint lacks is an error
    # (the data-parallel group lets an MTP stage without the embedding tie its own copy to it)
    sharded = model.sharded_state_dict(metadata={"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)})
    state = dist_checkpointing.load(sharded, mcore_dir, strict=StrictHandling.ASSUME_OK_UNEXPECTED)
    state = {k: v for k, v in state.items() if k not in ("checkpoint_version", "iteration")}
    model.load_state_dict(state, strict=False)
    # MTP is loaded (its keys were asked for) but not run: its forward needs labels
    model.mtp_process = False
    model.config.mtp_num_layers = None
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config["vocab_size"], (BATCH, SEQUENCE), generator=generator)
    positions = torch.arange(SEQUENCE).unsqueeze(0).expand(BATCH, -1)
    mask = torch.triu(torch.ones(SEQUENCE, SEQUENCE, dtype=torch.bool), diagonal=1)[None, None]
    hidden_shape = (SEQUENCE, BATCH, config["hidden_size"])
    with torch.no_grad():
        if not parallel_state.is_pipeline_first_stage():
            hidden = torch.empty(hidden_shape)
            torch.distributed.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        output = model(ids, positions, mask)
        if not parallel_state.is_pipeline_last_stage():
            torch.distributed.send(output.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
    if rank == world - 1:
        torch.save({"ids": ids, "logits": output}, result)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def mcore_logits(hf_dir: Path, mcore_dir: Path, tp: int = 1, pp: int = 1, ep: int = 1, spec: str = "te") -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, float32 logits) of the converted checkpoint, run in tp*pp*ep gloo processes."""
    import tempfile

    world = tp * pp * ep
    port = _free_port()
    with tempfile.TemporaryDirectory() as scratch:
        result = os.path.join(scratch, "logits.pt")
        args = (world, port, str(hf_dir), str(mcore_dir), tp, pp, ep, spec, result)
        # always in fresh processes: the CPU shim patches torch.cuda, which must not leak into the caller
        torch.multiprocessing.start_processes(_rank_main, args=args, nprocs=world, start_method="spawn", join=True)
        saved = torch.load(result)
    return saved["ids"], saved["logits"]


def compare(hf_dir: Path, mcore_dir: Path, **parallel) -> float:
    """Max |logit difference| between Megatron-Core (any layout) and transformers on the same tokens."""
    from converters.fixtures import hf_logits

    ids, logits = mcore_logits(hf_dir, mcore_dir, **parallel)
    return (logits - hf_logits(hf_dir, ids)).abs().max().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", type=Path, required=True, help="HF dir (BF16) with config.json")
    parser.add_argument("--mcore", type=Path, required=True, help="the dist_checkpointing_path (…/release)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--spec", choices=["te", "local"], default="te")
    args = parser.parse_args(argv)
    difference = compare(args.hf, args.mcore, tp=args.tp, pp=args.pp, ep=args.ep, spec=args.spec)
    verdict = "OK" if difference <= ATOL else "MISMATCH"
    print(f"max |logits difference| = {difference:.3g} (tolerance {ATOL}): {verdict}")
    return 0 if difference <= ATOL else 1


if __name__ == "__main__":
    sys.exit(main())
