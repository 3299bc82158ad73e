"""Load a converted torch_dist checkpoint into a real Megatron-Core GPTModel and compare logits with HF.

This is how a user (and our tests and demo) proves a conversion before a big launch. The model is
built from config.json with the config table, the keys it asks for are compared with the
checkpoint's `.metadata` (every missing key is listed by name), the checkpoint is loaded with verl's
exact call (`dist_checkpointing.load(model.sharded_state_dict(), path, strict=ASSUME_OK_UNEXPECTED)`)
and the logits are compared with transformers' (float32, on CPU).

Two backends, chosen by what the machine has (`--backend auto`):
  te   a GPU node with Transformer Engine: the model verl builds through Megatron-Bridge (TE spec,
       grouped experts (TEGroupedMLP), TENorm, sequence parallel at TP > 1), one process per GPU, NCCL.
       TE's float32 GEMMs use TF32, so logits agree to ~5e-3 (tolerance TE_ATOL), cosine ~1 - 3e-7.
  cpu  no GPU or no TE (CI, the demo): the local spec on CPU with gloo, the TE names mapped on when
       the checkpoint is `--spec te`; TP runs in eval mode. Tolerance ATOL (float32 reduction order).
Every process runs on 127.0.0.1.

    python -m converters.mcore.check --hf HF_DIR --mcore MCORE_DIR [--tp 2] [--ep 2] [--pp 2] [--json]

Exit codes: 0 loaded and logits match; 1 keys missing or logits differ; 2 bad input (no such
directory, not a checkpoint, too few GPUs for the layout).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from converters.mcore.params import checkpoint_spec, te_keys_map
from converters.mcore.world import NCCL_SAFE_ENV, free_port, init_layout, init_world
from toolkit.errors import ConvertError

# Logits are compared in float32; the two implementations order their reductions differently.
ATOL = 1e-4
# TE runs float32 GEMMs in TF32 (10-bit mantissa): 5.8e-4 .. 7.3e-4 max |diff|, cosine >= 0.9999998,
# measured on the tiny models at TP1/TP2/EP2/PP2 (2x H200, TE 2.20.2, megatron-core 0.16.1 and 0.19.2).
# A wrong or missing tensor moves logits by O(1).
TE_ATOL = 5e-3
SEQUENCE = 16  # divisible by TP (sequence parallel splits it)
BATCH = 2
# megatron-core 0.19 asks for this when q_lora_rank is null (seen on 2x H200; tests/data/te_keys/)
Q_NORM_WITHOUT_SOURCE = ".self_attention.linear_q_proj.layer_norm_weight"


class CheckError(ConvertError):
    """Bad input for the checker (exit code 2); the message says what to do."""


@dataclass
class CheckReport:
    backend: str
    layout: dict
    versions: dict
    asked_tensors: int = 0
    asked_objects: int = 0
    missing: list[str] = field(default_factory=list)
    wrong_shape: list[str] = field(default_factory=list)
    checkpoint_spec: str | None = None
    loaded: bool = False
    unset: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None
    cosine: float | None = None
    tolerance: float | None = None

    @property
    def ok(self) -> bool:
        return self.loaded and not self.unset and self.max_abs_diff is not None and self.max_abs_diff <= self.tolerance

    def to_json(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a TE build that fails to load its library
        return False
    return torch.cuda.is_available()


def pick_backend(requested: str, world: int) -> str:
    if requested == "cpu":
        return "cpu"
    if requested == "te" and not te_available():
        raise CheckError("--backend te: Transformer Engine with a GPU is not available in this Python")
    if requested == "auto" and not te_available():
        return "cpu"
    if torch.cuda.device_count() < world:
        raise CheckError(f"the layout needs {world} GPUs (one process per GPU) but this node has {torch.cuda.device_count()}")
    return "te"


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"torch": torch.__version__}
    for name in ("megatron-core", "transformer-engine", "transformers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def build_model(config: dict, tp: int, pp: int, ep: int, spec: str, backend: str = "cpu"):
    """A float32 GPTModel for this rank's stage: the TE spec as verl builds it, or the local spec on CPU."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    from converters.mcore.config import gpt_model_kwargs, mcore_config_kwargs, moe_layer_freq

    te = backend == "te"
    kwargs = mcore_config_kwargs(config)
    if te:  # Megatron-Bridge's DeepSeek provider for verl: grouped experts, SP whenever TP > 1
        kwargs.update(moe_grouped_gemm=True, sequence_parallel=tp > 1)
    else:
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
        use_cpu_initialization=not te,
        attention_dropout=0.0,
        hidden_dropout=0.0,
    )
    block = get_gpt_decoder_block_spec(transformer_config, use_transformer_engine=te)
    if not te:
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

        from converters.mcore.shim import local_core_attention

        # which of this stage's layers are dense comes from config.json: megatron-core 0.19 wraps the MLP
        # spec in functools.partial, so the spec no longer shows whether it holds experts
        offset, moe = get_transformer_layer_offset(transformer_config), moe_layer_freq(config)
        for index, layer_spec in enumerate(block.layer_specs):
            layer_spec.submodules.self_attention.submodules.core_attention = local_core_attention()
            if spec == "te":
                layer_spec.submodules.sharded_state_dict_keys_map = te_keys_map(dense=not moe[offset + index])
    mtp = None
    if transformer_config.mtp_num_layers:
        mtp = get_gpt_mtp_block_spec(transformer_config, block.layer_specs[-1], use_transformer_engine=te)
    model = GPTModel(
        config=transformer_config,
        transformer_layer_spec=block,
        mtp_block_spec=mtp,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=False,
        **gpt_model_kwargs(config),
    )
    return model.cuda() if te else model


def asked_keys(sharded_state_dict: dict) -> dict[str, list[int] | None]:
    """Every stored key a model's sharded state dict asks for: tensors with their global shape, objects None."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

    apply_factories(sharded_state_dict)
    asked: dict[str, list[int] | None] = {}
    for value in nested_values(sharded_state_dict):
        if isinstance(value, ShardedObject):
            asked[value.unique_key] = None
        elif isinstance(value, ShardedTensor):
            asked[value.key] = list(value.global_shape)
    return asked


def stored_keys(release: Path) -> dict[str, list[int] | None]:
    """Every key in a torch_dist checkpoint's `.metadata`: tensors with their size, byte objects None."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(release)).read_metadata().state_dict_metadata
    return {key: list(item.size) if isinstance(item, TensorStorageMetadata) else None for key, item in metadata.items()}


def coverage(asked: dict, stored: dict) -> tuple[list[str], list[str]]:
    """(keys the model asks for that the checkpoint lacks, tensors stored at another global shape)."""
    missing = sorted(key for key in asked if key not in stored)
    wrong = sorted(
        f"{key}: model {asked[key]}, checkpoint {stored[key]}"
        for key in asked
        if key in stored and asked[key] is not None and stored[key] is not None and asked[key] != stored[key]
    )
    return missing, wrong


def _forward(model, config: dict, tp: int, te: bool):
    from megatron.core import parallel_state

    device = torch.cuda.current_device() if te else "cpu"
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config["vocab_size"], (BATCH, SEQUENCE), generator=generator)
    positions = torch.arange(SEQUENCE).unsqueeze(0).expand(BATCH, -1)
    # TE's attention is causal by its spec; the local one takes the mask
    mask = None if te else torch.triu(torch.ones(SEQUENCE, SEQUENCE, dtype=torch.bool), diagonal=1)[None, None]
    # between pipeline stages the hidden state is split along the sequence under sequence parallelism
    local_sequence = SEQUENCE // tp if model.config.sequence_parallel else SEQUENCE
    with torch.no_grad():
        if not parallel_state.is_pipeline_first_stage():
            hidden = torch.empty((local_sequence, BATCH, config["hidden_size"]), device=device)
            torch.distributed.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        output = model(ids.to(device), positions.to(device), mask)
        if not parallel_state.is_pipeline_last_stage():
            torch.distributed.send(output.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
    return ids, output


def agreement_with_hf(hf_dir: Path, ids: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """(max |logits difference|, cosine) against transformers' float32 logits on the same tokens."""
    reference = hf_logits(hf_dir, ids)
    cosine = torch.nn.functional.cosine_similarity(logits.flatten(), reference.flatten(), dim=0).item()
    return (logits - reference).abs().max().item(), cosine


def check_on_rank(config: dict, mcore_dir: str, tp: int, pp: int, ep: int, spec: str, backend: str) -> dict:
    """On one rank of an initialised world: build, list asked keys (all ranks), load with verl's call, run.

    Returns the asked keys of every rank, what is missing or of the wrong shape, and (once loaded)
    the token ids and this rank's logits (meaningful on the last pipeline stage).
    """
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.validation import StrictHandling

    te = backend == "te"
    model = build_model(config, tp, pp, ep, spec, backend)
    model.eval()
    # (the data-parallel group lets an MTP stage without the embedding tie its own copy to it)
    metadata = {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    asked = asked_keys(model.sharded_state_dict(metadata=metadata))
    every_rank: list[dict] = [{} for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather_object(every_rank, asked)
    asked = {key: shape for part in every_rank for key, shape in part.items()}
    stored = stored_keys(Path(mcore_dir))
    missing, wrong = coverage(asked, stored)
    outcome = {"asked": asked, "missing": missing, "wrong_shape": wrong, "checkpoint_spec": checkpoint_spec(stored), "loaded": False}
    if missing or wrong:
        return outcome
    # verl's exact call: a key the model asks for and the checkpoint lacks is an error
    sharded = model.sharded_state_dict(metadata=metadata)
    state = dist_checkpointing.load(sharded, mcore_dir, strict=StrictHandling.ASSUME_OK_UNEXPECTED)
    state = {k: v for k, v in state.items() if k not in ("checkpoint_version", "iteration")}
    unset = model.load_state_dict(state, strict=False).missing_keys
    # MTP is loaded (its keys were asked for) but not run: its forward needs labels
    model.mtp_process = False
    model.config.mtp_num_layers = None
    ids, logits = _forward(model, config, tp, te)
    unset_everywhere: list[list[str]] = [[] for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather_object(unset_everywhere, [k for k in unset if not k.endswith("_extra_state")])
    outcome.update(loaded=True, unset=sorted({k for part in unset_everywhere for k in part}), ids=ids, logits=logits.float().cpu())
    return outcome


def _rank_main(rank: int, world: int, port: int, hf_dir: str, mcore_dir: str, tp: int, pp: int, ep: int, spec: str, backend: str, result: str) -> None:
    init_world(rank, world, port, backend == "te")
    init_layout(tp, pp, ep, backend == "te")
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    outcome = check_on_rank(config, mcore_dir, tp, pp, ep, spec, backend)
    if rank == world - 1:
        torch.save(outcome, result)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


# model_types transformers does not know, built with the class of the architecture they are (config.json's
# `architectures` says so): Kimi-K2 is DeepSeek-V3's architecture under its own name (its auto_map points at
# remote code, which the checker does not run)
HF_ARCHITECTURE_OF = {"kimi_k2": "deepseek_v3"}


def yarn_softmax_mscale(config: dict) -> float:
    """DeepSeek's softmax-scale factor under yarn: mscale(factor, mscale_all_dim)^2 (1.0 without it).
    DeepSeek's modeling code and vLLM multiply 1/sqrt(head dim) by it, and so does megatron-core
    (MLA with yarn); transformers 5.9's DeepseekV2Attention leaves it out (its DeepseekV3Attention has it)."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_get_mscale

    scaling = config.get("rope_scaling") or {}
    if scaling.get("type", scaling.get("rope_type")) != "yarn" or not scaling.get("mscale_all_dim"):
        return 1.0
    return yarn_get_mscale(scaling.get("factor", 1), scaling["mscale_all_dim"]) ** 2


def load_hf_model(model_dir):
    """The HF model as transformers builds it, float32 on CPU; kimi_k2 with DeepSeek-V3's classes, and
    deepseek_v2's attention with DeepSeek's yarn softmax scale (see yarn_softmax_mscale)."""
    import torch
    import transformers

    config = json.loads((Path(model_dir) / "config.json").read_text())
    model_type = config.get("model_type")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the MTP layer is "unexpected" to transformers: expected
    try:
        if model_type in HF_ARCHITECTURE_OF:
            known = {key: value for key, value in config.items() if key not in ("model_type", "auto_map")}
            hf_config = transformers.AutoConfig.for_model(HF_ARCHITECTURE_OF[model_type], **known)
            model_class = transformers.AutoModelForCausalLM._model_mapping[type(hf_config)]
            model = model_class.from_pretrained(model_dir, config=hf_config, dtype=torch.float32)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    finally:
        transformers.logging.set_verbosity(verbosity)
    if model_type == "deepseek_v2":
        factor = yarn_softmax_mscale(config)
        for layer in model.model.layers:
            layer.self_attn.scaling *= factor
    return model.eval()


def hf_logits(model_dir, token_ids):
    """float32 logits of a HF checkpoint on CPU, computed by transformers' model (`load_hf_model`)."""
    import torch

    model = load_hf_model(model_dir)
    with torch.no_grad():
        return model(token_ids).logits


def run_check(hf_dir: Path, mcore_dir: Path, tp: int = 1, pp: int = 1, ep: int = 1, spec: str = "te", backend: str = "cpu") -> tuple[CheckReport, dict]:
    """Build, compare keys, load and run in tp*pp*ep processes; (report, raw outcome incl. asked keys)."""
    hf_dir, mcore_dir = Path(hf_dir), Path(mcore_dir)
    if not (hf_dir / "config.json").is_file():
        raise CheckError(f"{hf_dir}: no config.json; give the HF (BF16) model dir the checkpoint was converted from")
    if (mcore_dir / "release" / ".metadata").is_file():
        mcore_dir = mcore_dir / "release"
    if not (mcore_dir / ".metadata").is_file():
        raise CheckError(f"{mcore_dir}: no .metadata; give the dist_checkpointing_path (DST/release) of `convert hf-mcore`")
    world = tp * pp * ep
    port = free_port()
    report = CheckReport(backend=backend, layout={"tp": tp, "pp": pp, "ep": ep, "sequence_parallel": backend == "te" and tp > 1}, versions=versions())
    with tempfile.TemporaryDirectory() as scratch:
        result = os.path.join(scratch, "outcome.pt")
        args = (world, port, str(hf_dir), str(mcore_dir), tp, pp, ep, spec, backend, result)
        if backend == "te":
            os.environ.update(NCCL_SAFE_ENV)
        # always in fresh processes: the CPU shim patches torch.cuda, which must not leak into the caller
        torch.multiprocessing.start_processes(_rank_main, args=args, nprocs=world, start_method="spawn", join=True)
        outcome = torch.load(result, weights_only=False)
    asked = outcome["asked"]
    report.asked_tensors = sum(shape is not None for shape in asked.values())
    report.asked_objects = sum(shape is None for shape in asked.values())
    report.missing, report.wrong_shape = outcome["missing"], outcome["wrong_shape"]
    report.checkpoint_spec = outcome["checkpoint_spec"]
    report.loaded = outcome["loaded"]
    report.unset = outcome.get("unset", [])
    report.tolerance = TE_ATOL if backend == "te" else ATOL
    if report.loaded:
        report.max_abs_diff, report.cosine = agreement_with_hf(hf_dir, outcome["ids"], outcome["logits"])
    return report, outcome


def compare(hf_dir: Path, mcore_dir: Path, **parallel) -> float:
    """Max |logit difference| between Megatron-Core (any layout, CPU) and transformers on the same tokens."""
    report, _ = run_check(hf_dir, mcore_dir, **parallel)
    if not report.loaded:
        raise CheckError(f"the checkpoint lacks {len(report.missing)} key(s) the model asks for: {', '.join(report.missing[:5])}"
                         + "".join(f"; {w}" for w in report.wrong_shape[:5]))
    return report.max_abs_diff


def describe(report: CheckReport, spec: str) -> list[str]:
    """The human summary: counts, what is missing (names only), the spec mismatch, the logits verdict."""
    layout = report.layout
    lines = [
        f"backend {report.backend}: TP={layout['tp']} PP={layout['pp']} EP={layout['ep']}"
        + (" (sequence parallel)" if layout["sequence_parallel"] else "")
        + f", megatron-core {report.versions.get('megatron-core')}, Transformer Engine {report.versions.get('transformer-engine') or '-'}",
        f"the model asks for {report.asked_tensors} tensors and {report.asked_objects} objects",
    ]
    if report.checkpoint_spec and report.checkpoint_spec != spec:
        lines.append(f"this checkpoint was written with --spec {report.checkpoint_spec}, but a {spec}-spec model reads it: "
                     f"re-convert with `convert hf-mcore --spec {spec}`" + (" (verl builds the TE spec)" if spec == "te" else ""))
    if any(key.endswith(Q_NORM_WITHOUT_SOURCE) for key in report.missing):
        lines.append(f"this megatron-core fuses a q norm into linear_q_proj when q_lora_rank is null ({Q_NORM_WITHOUT_SOURCE.strip('.')}); "
                     "the HF model has no such norm, so no checkpoint can give it a right value: "
                     "use megatron-core <= 0.18 for q_lora_rank-null models (DeepSeek-V2-Lite), or patch the 0.19 resolver "
                     "with `patcher apply` (its q-proj-norm patch), then re-run this check")
    if report.missing:
        lines.append(f"MISSING: {len(report.missing)} key(s) the model asks for are not in the checkpoint:")
        lines += [f"  {key}" for key in report.missing[:40]]
        if len(report.missing) > 40:
            lines.append(f"  ... and {len(report.missing) - 40} more (--json lists all)")
    for problem in report.wrong_shape[:20]:
        lines.append(f"WRONG SHAPE: {problem}")
    if report.unset:
        lines.append(f"UNSET: {len(report.unset)} parameter(s) the load left at their initial values: {', '.join(report.unset[:10])}")
    if report.loaded:
        verdict = "OK" if report.ok else "MISMATCH"
        lines.append(f"loaded with verl's call; max |logits difference| vs transformers = {report.max_abs_diff:.3g}, "
                     f"cosine {report.cosine:.8f} (tolerance {report.tolerance}): {verdict}")
    return lines


def main(argv: list[str] | None = None, prog: str = "convert check") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="exit codes:\n  0  loaded and the logits agree\n  1  a key is missing, a parameter "
                                     "unset or the logits disagree\n  2  bad input\n")
    parser.add_argument("--hf", type=Path, required=True, help="HF dir (BF16) with config.json")
    parser.add_argument("--mcore", type=Path, required=True, help="the dist_checkpointing_path (DST/release) or DST")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--spec", choices=["te", "local"], default="te", help="the spec the checkpoint is read as (verl: te)")
    parser.add_argument("--backend", choices=["auto", "te", "cpu"], default="auto",
                        help="te: TE model on GPUs with NCCL; cpu: local spec with gloo; auto: te when TE and enough GPUs are there")
    parser.add_argument("--keys-out", type=Path, help="write the keys the model asks for (key -> global shape) as JSON")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        if args.tp < 1 or args.pp < 1 or args.ep < 1:
            raise CheckError("--tp, --pp and --ep must be >= 1")
        backend = pick_backend(args.backend, args.tp * args.pp * args.ep)
        if backend == "te" and args.spec == "local":
            raise CheckError("--spec local is read by the local spec: use --backend cpu (verl builds the TE spec)")
        report, outcome = run_check(args.hf, args.mcore, tp=args.tp, pp=args.pp, ep=args.ep, spec=args.spec, backend=backend)
    except (CheckError, OSError) as exc:
        print(json.dumps({"error": str(exc), "exit_code": 2}) if args.json else f"{prog}: error: {exc}", file=sys.stdout if args.json else sys.stderr)
        return 2
    if args.keys_out:
        args.keys_out.write_text(json.dumps({"versions": report.versions, "layout": report.layout, "keys": outcome["asked"]}, indent=1, sort_keys=True) + "\n")
    print(json.dumps(report.to_json(), indent=2) if args.json else "\n".join(describe(report, args.spec)))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
