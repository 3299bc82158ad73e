"""`convert mcore-hf`: a Megatron-Core torch_dist checkpoint (ours, or verl's actor) back to HF safetensors.

The same model description (converters/mcore/params.py) runs backwards: every HF tensor is a region of one mcore tensor. Regions are
read from the stored DCP chunks that overlap them, one stored chunk at a time, and each HF shard is
streamed out tensor by tensor, so memory stays near the largest tensor.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

from atomicio import AtomicFile, atomic_copy, atomic_write_bytes
from converters.hf.safetensors_io import DTYPE_NAMES, OutputTensor, encode_header, order_for_writing, tensor_bytes
from converters.jobs.progress import Progress
from converters.mcore.mapping import plan_mapping
from converters.mcore.params import MTP_PARAMS, SPEC_MARKERS, checkpoint_spec, hf_tensor_shapes
from converters.preflight import check_free_space, check_paths, check_readable, read_config
from toolkit.errors import ConvertError
from toolkit.hf_config import ConfigEdit
from toolkit.safetensors_index import INDEX_NAME

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


@dataclass
class ExportSummary:
    dst: str
    shards: int = 0
    tensors: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    source: str = ""  # the torch_dist dir read (below what --src named)
    skipped_mtp_tensors: int = 0  # stored MTP tensors config.json does not declare (num_nextn_predict_layers 0)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


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


def export_hf(src: Path, hf_config_dir: Path, dst: Path, overwrite: bool = False, progress_factory=None) -> ExportSummary:
    """Write HF safetensors shards + index + config (and the config dir's tokenizer files) from mcore."""
    start = time.perf_counter()
    src, hf_config_dir, dst = Path(src), Path(hf_config_dir), Path(dst)
    if src.is_dir():
        src = find_dist_checkpoint(src)
    check_paths(src, dst)
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise ConvertError(f"--dst {dst} is not empty; choose an empty directory or pass --overwrite")
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
    tensors = {
        name: OutputTensor(name, DTYPE_NAMES[checkpoint.tensor_meta(rs[0].key).properties.dtype], _hf_shape(rs))
        for name, rs in regions.items()
    }
    shards = _assign_shards(list(tensors.values()))
    total = sum(t.nbytes for t in tensors.values())
    copies = [path for path in sorted(hf_config_dir.iterdir())
              if not path.is_dir() and path.name not in _SKIP_FROM_CONFIG_DIR and not path.name.endswith(".safetensors")]
    check_readable(copies)
    check_free_space(dst, total + sum(path.stat().st_size for path in copies), f"{len(tensors)} tensors")
    progress = (progress_factory or (lambda total: lambda n: None))(total)
    dst.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for index, group in enumerate(shards):
        name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(dst / name, group, regions, checkpoint, progress)
        weight_map.update(dict.fromkeys((t.name for t in group), name))
    for path in copies:
        atomic_copy(path, dst / path.name)
    edit = ConfigEdit(drop_quantization=True, disable_mtp=not any(k.startswith("mtp.") for k in keys), dtype="bfloat16")
    atomic_write_bytes(dst / "config.json", edit.apply(config_text).encode())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_bytes(dst / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())
    skipped = sum(1 for key, meta in checkpoint.metadata.state_dict_metadata.items()
                  if key.startswith("mtp.") and key not in used and isinstance(meta, TensorStorageMetadata))
    return ExportSummary(str(dst), len(shards), len(tensors), total, round(time.perf_counter() - start, 3), str(src), skipped)


def _hf_shape(regions: list[Region]) -> tuple[int, ...]:
    first = regions[0].sizes
    if len(first) == 3:  # one expert of a stacked tensor
        return first[1:]
    rows = sum(region.sizes[0] for region in regions) if len(regions) > 1 else first[0]
    return (rows, *first[1:])


def _assign_shards(tensors: list[OutputTensor]) -> list[list[OutputTensor]]:
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def _write_shard(path: Path, group: list[OutputTensor], regions, checkpoint: DistCheckpoint, progress) -> None:
    ordered = order_for_writing(group)
    with AtomicFile(path) as target:
        target.write(encode_header(ordered))
        for tensor in ordered:
            parts = [checkpoint.read(region) for region in regions[tensor.name]]
            data = torch.cat(parts) if len(parts) > 1 else parts[0]
            target.write(tensor_bytes(data.reshape(tensor.shape)))
            progress(tensor.nbytes)


def export_command(src: Path, hf_config: Path, dst: Path, overwrite: bool, as_json: bool, quiet: bool) -> int:
    """`convert mcore-hf`: export with progress and print the summary."""
    with Progress("mcore->hf", quiet=quiet or as_json) as progress:
        summary = export_hf(src, hf_config, dst, overwrite, progress.start)
    if as_json:
        print(json.dumps(summary.to_json(), indent=2))
    else:
        print(f"{summary.tensors} tensors in {summary.shards} shard(s), {summary.bytes_out / 1e9:.2f} GB in {summary.seconds:.1f} s: "
              f"{summary.dst} (read {summary.source})")
        if summary.skipped_mtp_tensors:
            print(f"config.json declares no MTP layer (num_nextn_predict_layers 0): {summary.skipped_mtp_tensors} stored MTP tensors left out")
    return 0
