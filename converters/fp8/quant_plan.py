"""Plan of `convert bf16-fp8`: which tensors become e4m3 (the release's choice), where each lands, the config.

The inverse of `fp8.plan`: every header read, every quantised tensor chosen and checked, before anything is
written. The choice is `hf.release.fp8_layout`'s, the one rule `convert mcore-hf --fp8` follows too: the model
description's FP8 entries (converters/mcore/params.py), or, with `--like RELEASE_DIR`, the release's own headers,
which then also give the shard of every tensor, the quantization_config, and the scale_inv of every quantised
weight: a block whose weights are unchanged keeps the release's scale, so that FP8 -> fp8-bf16 -> bf16-fp8
gives back the release's bytes. The run itself is the cast's (fp8.cast: the lifecycle's job, fp8.shard: read,
quantise, write).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from converters.fp8.plan import (
    CastError,
    CastOptions,
    CastPlan,
    Source,
    TensorJob,
    files_to_copy,
    make_shard,
    raise_problems,
)
from converters.hf.checkpoint import beyond_declared_layers
from converters.hf.release import FP8Tensor, ReleaseLayout, fp8_layout
from toolkit.errors import ConvertError
from toolkit.hf_config import ConfigEdit, ConfigFormatError
from toolkit.safetensors_index import TensorInfo


@dataclass(frozen=True)
class QuantOptions(CastOptions):
    like: Path | None = None  # a release dir: its FP8 choice, shard names, quantization_config and scales


def plan_quantise(src: Path, dst: Path, options: QuantOptions) -> CastPlan:
    """Read every header, choose and check every quantised tensor; raise CastError listing all problems."""
    source = Source.read(src, need_config=True)
    src, dst, config = source.path, Path(dst), source.config
    config_path = src / "config.json"
    try:
        release = ReleaseLayout.read(options.like) if options.like is not None else None
        if release is not None:
            release.refuse_overlap(dst)
    except ConvertError as exc:
        raise CastError(str(exc)) from exc
    problems = source.index_problems()
    raise_problems(problems, src)
    sources = {info.name: (info, header.path) for header in source.headers.values() for info in header.tensors.values()}
    already = sorted(name for name, (info, _) in sources.items() if info.dtype.startswith("F8_"))
    if already:
        raise CastError(f"{src}: {len(already)} tensor(s) are already FP8 ({', '.join(already[:3])}); give a BF16 checkpoint "
                        "(`convert fp8-bf16` makes one)")
    try:
        skipped, notes = beyond_declared_layers({name: info.shape for name, (info, _) in sources.items()}, config, drop_mtp=options.drop_mtp)
        mtp_layers = 0 if options.drop_mtp else (config.get("num_nextn_predict_layers") or 0)
        kept = {name: (info.dtype, info.shape) for name, (info, _) in sources.items() if name not in skipped}
        layout = fp8_layout(kept, config, mtp_layers, release, src)
    except KeyError as exc:
        raise CastError(f"{config_path}: lacks {exc} (needed to know which tensors the release quantises)") from exc
    except ConvertError as exc:
        raise CastError(str(exc)) from exc
    jobs: dict[str, list[TensorJob]] = {}
    for tensor in layout.tensors:
        info, path = sources[tensor.name]
        for shard, job in _jobs(tensor, info, path, source.weight_map[tensor.name]):
            jobs.setdefault(shard, []).append(job)
    identity = {
        "tool": "convert bf16-fp8",
        "source": str(src.resolve()),
        "drop_mtp": options.drop_mtp,
        "shards": source.shard_facts(),
    }
    if release:
        identity["like"] = release.identity()
    shards = [make_shard(name, shard_jobs) for name, shard_jobs in sorted(jobs.items())]
    config_out = _output_config(source.config_text, config_path, layout.quantization, options.drop_mtp)
    metadata = {key: value for key, value in source.index_metadata.items() if key != "total_size"}
    return CastPlan(src, dst, shards, layout.block, True, metadata, config_out, files_to_copy(src, set(source.headers)), options,
                    identity, tool="bf16-fp8", notes=notes)


def _jobs(tensor: FP8Tensor, info: TensorInfo, path: Path, source_shard: str) -> list[tuple[str, TensorJob]]:
    """(output shard, job) for one tensor: the source's shard, or the release's shard of each output; a weight whose
    scale_inv the release keeps in another shard is quantised for each of the two."""
    outputs = tensor.outputs
    shards = tensor.shards or (source_shard,) * len(outputs)
    if tensor.block is None:
        return [(shards[0], TensorJob(outputs[0], info, path))]
    prior, prior_path = tensor.prior or (None, None)
    job = TensorJob(outputs[0], info, path, quantise=True, scale_output=outputs[1], prior=prior, prior_path=prior_path)
    if shards[0] == shards[1]:
        return [(shards[0], job)]
    return [(shards[0], replace(job, scale_output=None)), (shards[1], replace(job, output=None))]


def _output_config(text: str | None, path: Path, quantization: dict[str, Any], drop_mtp: bool) -> str:
    """The source's config.json with the release's quantization_config (and 0 MTP layers under --drop-mtp)."""
    try:
        return ConfigEdit(drop_quantization=False, quantization=quantization, disable_mtp=drop_mtp).apply(text or "{}")
    except ConfigFormatError as exc:
        raise CastError(f"{path}: {exc}") from exc
