"""`convert mcore-hf`: a Megatron-Core torch_dist checkpoint (ours, or verl's actor) back to HF safetensors.

The same model description (converters/mcore/params.py) runs backwards: every HF tensor is a region of one mcore tensor. Regions are
read from the stored DCP chunks that overlap them, one stored chunk at a time, and each HF shard is
streamed out tensor by tensor, so memory stays near the largest tensor. The shards are the items of
the job lifecycle (`jobs.lifecycle`): claimed destination, resume after a kill, a finished mark.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

from atomicio import AtomicFile, atomic_copy, atomic_write_bytes
from converters.hf.checkpoint import SCALE_SUFFIX, layer_index, quantise
from converters.hf.release import ReleaseLayout, fp8_layout
from converters.hf.safetensors_io import (
    DTYPE_NAMES,
    OutputTensor,
    encode_header,
    file_offsets,
    is_complete,
    order_for_writing,
    read_tensor,
    tensor_bytes,
)
from converters.jobs.claim import temp_path
from converters.jobs.lifecycle import ItemWriter, Job, ProgressFactory, Report, is_finished_mark, run_job
from converters.jobs.options import JobOptions
from converters.jobs.progress import Progress
from converters.mcore.mapping import plan_mapping
from converters.mcore.params import MTP_PARAMS, SPEC_MARKERS, checkpoint_spec, hf_tensor_shapes
from converters.preflight import check_paths, check_readable, read_config
from kernels.fp8 import DEFAULT_BLOCK, FP8FormatError
from toolkit.errors import ConvertError
from toolkit.hf_config import ConfigEdit
from toolkit.safetensors_index import INDEX_NAME, TensorInfo

SHARD_BYTES = 5 * 1000**3
_SKIP_FROM_CONFIG_DIR = {INDEX_NAME, "config.json"}


@dataclass(frozen=True)
class Region:
    """Where an HF tensor lives in the mcore checkpoint: a box of one mcore tensor."""

    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


class DistCheckpoint:
    """A torch_dist checkpoint read lazily: regions assembled from the stored chunks that overlap them."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not (self.path / ".metadata").is_file():
            raise ConvertError(f"{self.path}: no .metadata; give the release/ (or iter_*) dir of a finished torch_dist checkpoint")
        self.metadata = FileSystemReader(str(self.path)).read_metadata()
        self._cached: tuple[MetadataIndex, torch.Tensor] | None = None

    def tensor_meta(self, key: str) -> TensorStorageMetadata:
        meta = self.metadata.state_dict_metadata.get(key)
        if not isinstance(meta, TensorStorageMetadata):
            raise ConvertError(f"{self.path}: tensor {key} is not in the checkpoint")
        return meta

    def _chunk(self, key: str, offsets: torch.Size) -> torch.Tensor:
        index = MetadataIndex(key, offsets)
        if self._cached is not None and self._cached[0] == index:
            return self._cached[1]
        info = self.metadata.storage_data[index]
        with open(self.path / info.relative_path, "rb") as handle:
            handle.seek(info.offset)
            data = handle.read(info.length)
        tensor = torch.load(io.BytesIO(data), weights_only=True)
        self._cached = (index, tensor)
        return tensor

    def read(self, region: Region) -> torch.Tensor:
        meta = self.tensor_meta(region.key)
        out = torch.empty(region.sizes, dtype=meta.properties.dtype)
        covered = 0
        for chunk in meta.chunks:
            low = [max(a, b) for a, b in zip(region.offsets, chunk.offsets, strict=True)]
            high = [min(a + s, b + t) for a, s, b, t in zip(region.offsets, region.sizes, chunk.offsets, chunk.sizes, strict=True)]
            if any(lo >= hi for lo, hi in zip(low, high, strict=True)):
                continue
            stored = self._chunk(region.key, chunk.offsets)
            source = stored[tuple(slice(lo - o, hi - o) for lo, hi, o in zip(low, high, chunk.offsets, strict=True))]
            out[tuple(slice(lo - o, hi - o) for lo, hi, o in zip(low, high, region.offsets, strict=True))] = source
            covered += source.numel()
        if covered != out.numel():
            raise ConvertError(f"{self.path}: {region.key} region {region.offsets}+{region.sizes} is not fully stored")
        return out


def detect_spec(keys: set[str]) -> str:
    """The spec (te, local) whose names a checkpoint uses; ConvertError when it has neither's."""
    spec = checkpoint_spec(keys)
    if spec is None:
        names = " / ".join(marker.removeprefix("self_attention.") for markers in SPEC_MARKERS.values() for marker in markers)
        raise ConvertError(f"the checkpoint has neither TE nor local-spec MLA keys ({names})")
    return spec


def hf_regions(config: dict[str, Any], keys: set[str]) -> dict[str, list[Region]]:
    """HF name -> the mcore regions that make it (several when a big tensor was stored in row chunks)."""
    stored = len({key.split(".")[2] for key in keys if key.startswith("mtp.layers.")})
    # config.json is the model: MTP layers it does not declare are left out (verl's config sets 0)
    mtp_layers = stored if (config.get("num_nextn_predict_layers") or 0) > 0 else 0
    shapes = hf_tensor_shapes(config, mtp_layers)
    plan = plan_mapping(config, shapes, detect_spec(keys), drop_mtp=mtp_layers == 0)
    regions: dict[str, list[Region]] = {}
    for tensor in plan.tensors:
        for chunk in tensor.chunks:
            regions.setdefault(chunk.source, []).append(Region(tensor.key, chunk.offsets, chunk.sizes))
    layers = config["num_hidden_layers"]
    for k in range(mtp_layers):  # the MTP layer's copies of the embedding and the head
        prefix = f"model.layers.{layers + k}."
        for param in (param for param in MTP_PARAMS if param.copy_of):
            regions[prefix + param.hf[0]] = next(regions[name] for name in param.copy_of if name in regions)
    return {name: regions[name] for name in shapes}


TRACKER = "latest_checkpointed_iteration.txt"
# where the torch_dist files sit below a dir the user may name: ours/Megatron's release, verl's actor
# (global_step_N/actor/model/dist_ckpt: verl 0.9 with use_dist_checkpointing), verl's global_step_N
_BELOW = ("release", "model/dist_ckpt", "actor/model/dist_ckpt")


def find_dist_checkpoint(src: Path) -> Path:
    """The dir holding `.metadata` for what the user named: a torch_dist dir, our or Megatron's checkpoint dir
    (release/ or iter_NNNNNNN/ by its tracker), verl's checkpoints dir (the latest global_step_N by its
    tracker), a global_step_N dir or its actor/ dir."""
    src = Path(src)
    if (src / ".metadata").is_file():
        return src
    for below in _BELOW:
        if (src / below / ".metadata").is_file():
            return src / below
    tracker = src / TRACKER
    if tracker.is_file():
        step = tracker.read_text().strip()
        candidates = [src / "release"] if step == "release" else \
            [src / f"global_step_{step}" / "actor" / "model" / "dist_ckpt", src / f"iter_{int(step):07d}"] if step.isdigit() else []
        for candidate in candidates:
            if (candidate / ".metadata").is_file():
                return candidate
        raise ConvertError(f"{tracker} names step {step!r}, but {' or '.join(map(str, candidates)) or 'no dir'} holds no .metadata "
                           "(a save cut short?); give an earlier global_step_N dir")
    hf_copy = next((p for p in (src / "model" / "huggingface", src / "actor" / "model" / "huggingface")
                    if any(p.glob("*.safetensors"))), None)
    if hf_copy is not None:
        raise ConvertError(f"{src}: verl saved this actor as HF safetensors in {hf_copy} (use_dist_checkpointing was off): "
                           "that dir is already an HF checkpoint")
    raise ConvertError(f"{src}: no .metadata here, in release/, model/dist_ckpt/ or actor/model/dist_ckpt/, and no {TRACKER}; "
                       "give a torch_dist checkpoint, verl's checkpoints dir, or one of its global_step_N dirs")


@dataclass(frozen=True)
class ExportOptions(JobOptions):
    fp8: bool = False  # write DeepSeek's FP8 release format (e4m3 + scale_inv per block) instead of the stored dtype
    like: Path | None = None  # with fp8: a release dir whose choice, shard names, quantization_config and scales are kept


STATE_DIR = ".mcore-hf"
FINISHED_FILE = ".mcore-hf-source.json"  # kept: lets a re-run recognise its own finished export


def _shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


@dataclass
class ExportPlan(Job):
    """The lifecycle's items are the HF shards; the other files, config.json and the index finish it."""

    src: Path  # the torch_dist dir (below what --src named)
    dst: Path
    hf_config_dir: Path
    options: ExportOptions
    config_text: str
    regions: dict[str, list[Region]]
    shards: list[list[OutputTensor]]  # in writing order
    headers: list[bytes]
    names: list[str]  # of the shards
    copies: list[Path]  # the config dir's other files (tokenizer, ...), copied as they are
    identity: dict[str, Any]
    disable_mtp: bool
    skipped_mtp_tensors: int
    # --fp8: every quantised weight, with the release's scale_inv (info, file) to keep where it still fits (--like)
    fp8: dict[str, tuple[TensorInfo, Path] | None] = field(default_factory=dict)
    quantization: dict[str, Any] | None = None  # --fp8: config.json's quantization_config
    block: tuple[int, int] = DEFAULT_BLOCK
    item_noun = "shard"

    @property
    def state_dir(self) -> Path:
        return self.dst / STATE_DIR

    @property
    def finished_mark(self) -> Path:
        return self.dst / FINISHED_FILE

    def shard_name(self, index: int) -> str:
        return self.names[index]

    def item_sizes(self) -> list[int]:
        return [len(header) + sum(t.nbytes for t in group) for header, group in zip(self.headers, self.shards, strict=True)]

    def item_done(self, index: int) -> bool:
        header = self.headers[index]
        return is_complete(self.dst / self.shard_name(index), header, len(header) + sum(t.nbytes for t in self.shards[index]))

    def preflight(self, pending: list[int]) -> int:
        check_readable(self.copies)
        return sum(path.stat().st_size for path in self.copies)

    def describe(self, pending: list[int]) -> str:
        return f"{sum(len(self.shards[index]) for index in pending)} tensors"

    def progress_total(self, pending: list[int]) -> int:
        return sum(t.nbytes for index in pending for t in self.shards[index])

    def open_writer(self, device: str) -> ShardExport:
        return ShardExport(self, device)

    def forget(self) -> None:
        for path in [self.dst / INDEX_NAME] + [self.dst / self.shard_name(index) for index in range(len(self.shards))]:
            path.unlink(missing_ok=True)

    def finalize(self) -> None:
        """The config dir's files, config.json (BF16, or FP8 with --fp8), then the index (the finished mark follows it)."""
        for path in self.copies:
            atomic_copy(path, self.dst / path.name)
        edit = ConfigEdit(drop_quantization=self.quantization is None, quantization=self.quantization, disable_mtp=self.disable_mtp,
                          dtype="bfloat16")
        atomic_write_bytes(self.dst / "config.json", edit.apply(self.config_text).encode())
        weight_map = {t.name: self.shard_name(index) for index, group in enumerate(self.shards) for t in group}
        index = {"metadata": {"total_size": sum(t.nbytes for group in self.shards for t in group)},
                 "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_bytes(self.dst / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())


class ShardExport(ItemWriter):
    """Writes HF shards from one lazily read dist checkpoint, each renamed into place when complete."""

    def __init__(self, plan: ExportPlan, device: str) -> None:
        self.plan = plan
        self.device = torch.device(device)
        self.checkpoint = DistCheckpoint(plan.src)
        self.seconds: dict[str, float] = {}

    def write(self, index: int, progress: Report) -> None:
        """The shard's tensors at their offsets; a quantised weight is read and quantised once for its codes and
        scale_inv (written wherever each sits: a release may keep one in another shard)."""
        plan, name = self.plan, self.plan.shard_name(index)
        group = plan.shards[index]
        offsets = file_offsets(plan.headers[index], group)
        with AtomicFile(plan.dst / name, tmp_path=temp_path(plan.state_dir, name)) as target:
            target.write(plan.headers[index])
            for source in dict.fromkeys(_source_name(tensor.name, plan.fp8) for tensor in group):
                parts = [self.checkpoint.read(region) for region in plan.regions[source]]
                data = torch.cat(parts) if len(parts) > 1 else parts[0]
                data = data.reshape(_hf_shape(plan.regions[source]))
                if source in plan.fp8:
                    prior = plan.fp8[source]
                    try:
                        [pair] = quantise([data], plan.block, self.device, [None if prior is None else read_tensor(prior[1], prior[0])], [source])
                    except FP8FormatError as exc:
                        raise ConvertError(f"{name}: {exc}") from exc
                    written = dict(zip((source, source + SCALE_SUFFIX), pair, strict=True))
                else:
                    written = {source: data}
                for tensor_name, tensor in written.items():
                    if tensor_name in offsets:
                        target.write_at(offsets[tensor_name], tensor_bytes(tensor))
                        progress(tensor.numel() * tensor.element_size())

    def close(self) -> None:
        pass  # each shard landed (fsync, rename) before write returned

    def abandon(self) -> None:
        pass


@dataclass
class ExportSummary:
    dst: str
    shards: int = 0  # what the export holds
    tensors: int = 0  # the model's tensors (a quantised weight's scale_inv not counted apart)
    bytes_out: int = 0
    seconds: float = 0.0
    source: str = ""  # the torch_dist dir read (below what --src named)
    skipped_mtp_tensors: int = 0  # stored MTP tensors config.json does not declare (num_nextn_predict_layers 0)
    shards_written: int = 0
    shards_skipped: int = 0  # found complete (a resumed export)
    finalized: bool = False
    already_finished: bool = False  # the destination held this export, finished: nothing was written
    fp8_tensors: int = 0  # --fp8: weights written as e4m3 + scale_inv

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def plan_export(src: Path, hf_config_dir: Path, dst: Path, options: ExportOptions | None = None,
                shard_bytes: int | None = None) -> ExportPlan:
    """Everything decided from the dist checkpoint's `.metadata` and config.json; nothing written."""
    options = options or ExportOptions()
    src, hf_config_dir, dst = Path(src), Path(hf_config_dir), Path(dst)
    if src.is_dir():
        src = find_dist_checkpoint(src)
    check_paths(src, dst)
    config_text, config = read_config(hf_config_dir / "config.json")
    checkpoint = DistCheckpoint(src)
    keys = set(checkpoint.metadata.state_dict_metadata)
    try:
        regions = hf_regions(config, keys)
    except KeyError as exc:
        raise ConvertError(f"{hf_config_dir / 'config.json'}: lacks {exc}") from exc
    used = {r.key for rs in regions.values() for r in rs}
    missing = sorted(used - keys)
    if missing:
        raise ConvertError(f"{src}: {len(missing)} tensor(s) the model needs are missing: {', '.join(missing[:8])}")
    tensors = [
        OutputTensor(name, DTYPE_NAMES[checkpoint.tensor_meta(rs[0].key).properties.dtype], _hf_shape(rs))
        for name, rs in regions.items()
    ]
    copies = [path for path in sorted(hf_config_dir.iterdir())
              if not path.is_dir() and path.name not in _SKIP_FROM_CONFIG_DIR and not path.name.endswith(".safetensors")
              and not is_finished_mark(path.name)]
    stored = [src / ".metadata", *sorted(src.glob("*.distcp"))]
    identity = {
        "tool": "convert mcore-hf",
        "source": str(src.resolve()),
        "hf_config": str(hf_config_dir.resolve()),
        "shard_bytes": shard_bytes or SHARD_BYTES,
        "files": {str(path.resolve()): [path.stat().st_size, path.stat().st_mtime_ns]
                  for path in [*stored, hf_config_dir / "config.json", *copies] if path.exists()},
    }
    fp8: dict[str, tuple[TensorInfo, Path] | None] = {}
    quantization = block = release = None
    if options.fp8:
        release = ReleaseLayout.read(options.like) if options.like is not None else None
        if release is not None:
            release.refuse_overlap(dst)
        layers = config["num_hidden_layers"]
        mtp_layers = len({layer for t in tensors if (layer := layer_index(t.name)) is not None and layer >= layers})
        layout = fp8_layout({t.name: (t.dtype, t.shape) for t in tensors}, config, mtp_layers, release, src)
        tensors = [output for tensor in layout.tensors for output in tensor.outputs]
        fp8 = {tensor.name: tensor.prior for tensor in layout.tensors if tensor.block is not None}
        quantization, block = layout.quantization, layout.block
        identity["fp8"] = release.identity() if release else True
    if options.fp8 and release is not None:  # the release's shards
        groups: dict = {}
        for tensor in layout.tensors:
            for output, shard in zip(tensor.outputs, tensor.shards, strict=True):
                groups.setdefault(shard, []).append(output)
        groups = dict(sorted(groups.items()))
    else:
        groups = dict(enumerate(_assign_shards(tensors, shard_bytes or SHARD_BYTES)))
    names = [name if isinstance(name, str) else _shard_name(name, len(groups)) for name in groups]
    shards = [order_for_writing(group) for group in groups.values()]
    skipped = sum(1 for key, meta in checkpoint.metadata.state_dict_metadata.items()
                  if key.startswith("mtp.") and key not in used and isinstance(meta, TensorStorageMetadata))
    return ExportPlan(src, dst, hf_config_dir, options, config_text, regions, shards, [encode_header(group) for group in shards],
                      names, copies, identity, not any(k.startswith("mtp.") for k in keys), skipped, fp8, quantization,
                      block or DEFAULT_BLOCK)


def _source_name(name: str, fp8: dict[str, tuple[TensorInfo, Path] | None]) -> str:
    """The HF weight an output tensor is made from (a scale_inv: its quantised weight's)."""
    base = name.removesuffix(SCALE_SUFFIX)
    return base if base != name and base in fp8 else name


def export_hf(plan: ExportPlan, progress_factory: ProgressFactory | None = None) -> ExportSummary:
    """Write the pending HF shards (resuming), then the index, config.json and the config dir's files."""
    result = run_job(plan, progress_factory)
    every = [t for group in plan.shards for t in group]
    scales = sum(1 for t in every if t.name.endswith(SCALE_SUFFIX) and t.name.removesuffix(SCALE_SUFFIX) in plan.fp8)
    return ExportSummary(str(plan.dst), len(plan.shards), len(every) - scales, sum(t.nbytes for t in every), round(result.seconds, 3),
                         str(plan.src), plan.skipped_mtp_tensors, len(result.written), result.skipped, result.finalized,
                         result.already_finished, len(plan.fp8))


def _hf_shape(regions: list[Region]) -> tuple[int, ...]:
    first = regions[0].sizes
    if len(first) == 3:  # one expert of a stacked tensor
        return first[1:]
    rows = sum(region.sizes[0] for region in regions) if len(regions) > 1 else first[0]
    return (rows, *first[1:])


def _assign_shards(tensors: list[OutputTensor], shard_bytes: int) -> list[list[OutputTensor]]:
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        # a scale_inv stays beside its weight
        if shards[-1] and size + tensor.nbytes > shard_bytes and not tensor.name.endswith(SCALE_SUFFIX):
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def export_command(src: Path, hf_config: Path, dst: Path, options: ExportOptions, as_json: bool, quiet: bool) -> int:
    """`convert mcore-hf`: plan, export with progress, print; 0 done (also: nothing to do)."""
    plan = plan_export(src, hf_config, dst, options)
    with Progress("mcore->hf", quiet=quiet or as_json) as progress:
        summary = export_hf(plan, progress.start)
    if as_json:
        print(json.dumps(summary.to_json(), indent=2))
    else:
        if summary.already_finished:
            print("already complete: nothing to do")
        elif summary.shards_skipped:
            print(f"{summary.shards_skipped} shard(s) already there, {summary.shards_written} written")
        fp8 = f" ({summary.fp8_tensors} weights as FP8 e4m3 + scale_inv)" if summary.fp8_tensors else ""
        print(f"{summary.tensors} tensors{fp8} in {summary.shards} shard(s), {summary.bytes_out / 1e9:.2f} GB in {summary.seconds:.1f} s: "
              f"{summary.dst} (read {summary.source})")
        if summary.skipped_mtp_tensors:
            print(f"config.json declares no MTP layer (num_nextn_predict_layers 0): {summary.skipped_mtp_tensors} stored MTP tensors left out")
    return 0 if summary.finalized else 1
