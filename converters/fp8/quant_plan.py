"""Plan of `convert bf16-fp8`: which tensors become e4m3 (the release's choice), where each lands, the config.

The inverse of `fp8.plan`: every header read, every quantised tensor chosen and checked, before anything is
written. Which tensors are quantised comes from the model description (converters/mcore/params.py: the 2-D
projections of attention and MLP; norms, router, expert bias, embeddings, the head and the MTP eh_proj stay as
they are), or, with `--like RELEASE_DIR`, from the release's own headers, which then also give the shard of
every tensor, the quantization_config, and the scale_inv of every quantised weight: a block whose weights are
unchanged keeps the release's scale, so that FP8 -> fp8-bf16 -> bf16-fp8 gives back the release's bytes.
The run itself is the cast's (fp8.cast: the lifecycle's job, fp8.shard: read, quantise, write).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from converters.fp8.plan import CastError, CastOptions, CastPlan, TensorJob, files_to_copy, make_shard
from converters.hf.checkpoint import beyond_declared_layers
from converters.hf.release import RELEASE_QUANTIZATION, SCALE_SUFFIX, ReleaseLayout
from converters.hf.safetensors_io import OutputTensor
from converters.mcore.params import release_fp8_names
from converters.preflight import read_config
from kernels.fp8 import DEFAULT_BLOCK, scale_shape
from toolkit.errors import ConvertError
from toolkit.hf_config import ConfigEdit, ConfigFormatError
from toolkit.safetensors_index import INDEX_NAME, SafetensorsError, TensorInfo, load_index, read_header

QUANTISABLE = {"BF16", "F16", "F32"}


@dataclass(frozen=True)
class QuantOptions(CastOptions):
    like: Path | None = None  # a release dir: its FP8 choice, shard names, quantization_config and scales


def plan_quantise(src: Path, dst: Path, options: QuantOptions) -> CastPlan:
    """Read every header, choose and check every quantised tensor; raise CastError listing all problems."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CastError(f"{src}: not a directory")
    config_path = src / "config.json"
    config_text, config = read_config(config_path)
    try:
        weight_map, index_metadata = load_index(src)
        missing = [name for name in sorted(set(weight_map.values())) if not (src / name).is_file()]
        if missing:
            raise CastError(f"{src}: {len(missing)} shard(s) listed in {INDEX_NAME} are missing: {', '.join(missing[:5])}")
        headers = {name: read_header(src / name) for name in sorted(set(weight_map.values()))}
    except SafetensorsError as exc:
        raise CastError(str(exc)) from exc
    try:
        release = ReleaseLayout.read(options.like) if options.like is not None else None
    except ConvertError as exc:
        raise CastError(str(exc)) from exc
    block = release.block() if release else DEFAULT_BLOCK
    sources = {info.name: (info, header.path) for header in headers.values() for info in header.tensors.values()}
    already = sorted(name for name, (info, _) in sources.items() if info.dtype.startswith("F8_"))
    if already:
        raise CastError(f"{src}: {len(already)} tensor(s) are already FP8 ({', '.join(already[:3])}); give a BF16 checkpoint "
                        "(`convert fp8-bf16` makes one)")
    try:
        skipped, notes = beyond_declared_layers({name: info.shape for name, (info, _) in sources.items()}, config, drop_mtp=options.drop_mtp)
    except KeyError as exc:
        raise CastError(f"{config_path}: lacks {exc}") from exc
    kept = {name: source for name, source in sources.items() if name not in skipped}
    mtp_layers = 0 if options.drop_mtp else (config.get("num_nextn_predict_layers") or 0)
    if release:
        chosen = release.fp8_names() - skipped
    else:
        try:
            chosen = release_fp8_names(config, mtp_layers)
        except KeyError as exc:
            raise CastError(f"{config_path}: lacks {exc} (needed to know which tensors the release quantises)") from exc

    problems: list[str] = []
    absent = sorted(chosen - set(kept))
    if absent:
        whose = f"the release {release.path} quantises" if release else "config.json's model quantises"
        problems.append(f"{len(absent)} tensor(s) {whose} are not in {src}: {', '.join(absent[:5])}")
    jobs: dict[str, list[TensorJob]] = {}
    for name, (info, path) in kept.items():
        if name not in chosen:
            shard = _output_shard(name, weight_map, release, problems)
            if shard is not None:
                jobs.setdefault(shard, []).append(TensorJob(OutputTensor(name, info.dtype, info.shape), info, path))
            continue
        job = _quant_job(info, path, block, release, problems)
        if job is None:
            continue
        codes_shard = _output_shard(name, weight_map, release, problems)
        scale_shard = codes_shard if release is None else release.weight_map.get(name + SCALE_SUFFIX, codes_shard)
        if codes_shard == scale_shard:
            jobs.setdefault(codes_shard, []).append(job)
        elif codes_shard is not None:  # the release keeps this scale_inv in another shard: quantised for each
            jobs.setdefault(codes_shard, []).append(replace(job, scale_output=None))
            jobs.setdefault(scale_shard, []).append(replace(job, output=None))
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CastError(f"{len(problems)} problem(s) in {src}, nothing written:\n  {shown}{more}")
    identity = {
        "tool": "convert bf16-fp8",
        "source": str(src.resolve()),
        "drop_mtp": options.drop_mtp,
        "shards": {name: [h.file_size, (src / name).stat().st_mtime_ns] for name, h in headers.items()},
    }
    if release:
        index = release.path / INDEX_NAME
        identity["like"] = [str(release.path.resolve()), index.stat().st_size if index.exists() else 0,
                            index.stat().st_mtime_ns if index.exists() else 0]
    shards = [make_shard(name, shard_jobs) for name, shard_jobs in sorted(jobs.items())]
    config_out = _output_config(config_text, config_path, release.quantization if release else RELEASE_QUANTIZATION, options.drop_mtp)
    copies = files_to_copy(src, set(headers))
    return CastPlan(src, dst, shards, block, True, {k: v for k, v in index_metadata.items() if k != "total_size"},
                    config_out, copies, options, identity, tool="bf16-fp8", notes=notes)


def _output_shard(name: str, weight_map: dict[str, str], release: ReleaseLayout | None, problems: list[str]) -> str | None:
    """The source's shard name, or with --like the release's shard of the tensor."""
    if release is None:
        return weight_map[name]
    shard = release.weight_map.get(name)
    if shard is None:
        problems.append(f"{name} is not in the release's index ({release.path / INDEX_NAME}): --like names another model?")
    return shard


def _quant_job(info: TensorInfo, path: Path, block: tuple[int, int], release: ReleaseLayout | None, problems: list[str]) -> TensorJob | None:
    if info.dtype not in QUANTISABLE or len(info.shape) != 2:
        problems.append(f"{path.name}: {info.name} is {info.dtype}{list(info.shape)}; a quantised tensor must be a 2-D BF16/F16/F32 weight")
        return None
    grid = scale_shape(info.shape, block)
    prior = prior_path = None
    if release is not None:
        why = release.mismatch(info.name, info.shape)
        if why:
            problems.append(why)
            return None
        prior, prior_path = release.scale(info.name, grid) or (None, None)
    return TensorJob(OutputTensor(info.name, "F8_E4M3", info.shape), info, path, quantise=True,
                     scale_output=OutputTensor(info.name + SCALE_SUFFIX, "F32", grid), prior=prior, prior_path=prior_path)


def _output_config(text: str, path: Path, quantization: dict[str, Any], drop_mtp: bool) -> str:
    """The source's config.json with the release's quantization_config (and 0 MTP layers under --drop-mtp)."""
    try:
        return ConfigEdit(drop_quantization=False, quantization=quantization, disable_mtp=drop_mtp).apply(text)
    except ConfigFormatError as exc:
        raise CastError(f"{path}: {exc}") from exc
