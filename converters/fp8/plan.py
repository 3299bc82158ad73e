"""Plan of `convert fp8-bf16` (and what `bf16-fp8`'s plan shares): every header read and checked, every scale
found, before anything is written.

The plan names each output shard, its exact header bytes and how each tensor is made (copied, or
dequantised from a weight and its scale), the files copied as they are, and the output config.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converters.hf.checkpoint import SCALE_SUFFIX, layer_index
from converters.hf.safetensors_io import OutputTensor, encode_header, file_offsets, is_complete, order_for_writing
from converters.jobs.lifecycle import is_finished_mark
from converters.jobs.options import JobOptions
from converters.preflight import read_config
from kernels.fp8 import DEFAULT_BLOCK, scale_shape
from toolkit.errors import ConvertError
from toolkit.hf_config import ConfigEdit, ConfigFormatError
from toolkit.safetensors_index import INDEX_NAME, SafetensorsError, ShardHeader, TensorInfo, load_index, read_header

TOOLS = ("fp8-bf16", "bf16-fp8")  # the commands this package runs; each keeps its state in DST/.TOOL/
SKIP_DIRS = {".git", ".cache", *(f".{tool}" for tool in TOOLS)}  # never copied: our own state


class CastError(ConvertError):
    """An expected failure of the FP8 cast; the message says what and what to do."""


@dataclass(frozen=True)
class CastOptions(JobOptions):
    device: str = "auto"
    drop_mtp: bool = False
    batch_bytes: int = 512 * 1024 * 1024


@dataclass(frozen=True)
class TensorJob:
    """How one source tensor is written: copied, dequantised with its scale, or quantised. A quantised weight
    writes its e4m3 codes (`output`) and its `scale_output` (scale_inv), one of them None when a release
    (--like) keeps that one in another shard; `prior` is the release's scale_inv, kept where it still fits."""

    output: OutputTensor | None
    source: TensorInfo
    source_path: Path
    scale: TensorInfo | None = None
    scale_path: Path | None = None
    quantise: bool = False
    scale_output: OutputTensor | None = None
    prior: TensorInfo | None = None
    prior_path: Path | None = None

    @property
    def outputs(self) -> tuple[OutputTensor, ...]:
        return tuple(output for output in (self.output, self.scale_output) if output is not None)

    @property
    def input_bytes(self) -> int:
        return self.source.nbytes + sum(info.nbytes for info in (self.scale, self.prior) if info is not None)


@dataclass
class ShardJob:
    name: str
    jobs: list[TensorJob]  # in the order their first output sits in the file
    header: bytes
    offsets: dict[str, int]  # output tensor -> where its bytes start in the file

    @property
    def output_size(self) -> int:
        return len(self.header) + sum(output.nbytes for job in self.jobs for output in job.outputs)

    @property
    def input_bytes(self) -> int:
        return sum(job.input_bytes for job in self.jobs)


def make_shard(name: str, jobs: list[TensorJob]) -> ShardJob:
    """The shard's exact header and layout (wider dtypes first, then by name) and its jobs in file order."""
    outputs = order_for_writing([output for job in jobs for output in job.outputs])
    header = encode_header(outputs)
    offsets = file_offsets(header, outputs)
    return ShardJob(name, sorted(jobs, key=lambda job: offsets[job.outputs[0].name]), header, offsets)


@dataclass
class CastPlan:
    src: Path
    dst: Path
    shards: list[ShardJob]
    block: tuple[int, int]
    has_index: bool
    index_metadata: dict[str, object]
    config_out: str | None  # the output's config.json, made (and so checked) while planning
    copies: list[Path]  # other files of the source, relative to it, copied as they are
    options: CastOptions
    identity: dict[str, object] = field(default_factory=dict)
    tool: str = "fp8-bf16"  # the command: fp8-bf16 dequantises, bf16-fp8 quantises
    notes: list[str] = field(default_factory=list)  # one line each, printed with the summary (tensors skipped and why)

    @property
    def state_dir(self) -> Path:
        return self.dst / f".{self.tool}"

    @property
    def finished_mark(self) -> Path:
        # what this output was made from, so a later run into the same dir never takes another source's
        # same-shaped output for its own
        return self.dst / finished_mark_name(self.tool)

    @property
    def kernel_stage(self) -> str:
        return "dequant" if self.tool == "fp8-bf16" else "quant"


def _block_size(config: dict[str, object], path: Path) -> tuple[int, int]:
    quantization = config.get("quantization_config") or {}
    block = quantization.get("weight_block_size", DEFAULT_BLOCK) if isinstance(quantization, dict) else DEFAULT_BLOCK
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CastError(f"{path}: quantization_config.weight_block_size is {block!r}, expected two positive integers such as [128, 128]")
    return (block[0], block[1])


def _output_config(config_text: str, path: Path, drop_mtp: bool) -> str:
    edit = ConfigEdit(drop_quantization=True, disable_mtp=drop_mtp, dtype="bfloat16")
    try:
        return edit.apply(config_text)
    except ConfigFormatError as exc:
        raise CastError(f"{path}: {exc}") from exc


def finished_mark_name(tool: str) -> str:
    return f".{tool}-source.json"


def files_to_copy(src: Path, shard_names: set[str]) -> list[Path]:
    """Every file of the source but the shards, the index and config.json (which are written anew), and a
    converter's finished mark (the source's own identity, not the output's)."""
    copies = []
    for path in sorted(src.rglob("*")):
        relative = path.relative_to(src)
        if relative.parts[0] in SKIP_DIRS or str(relative) in shard_names | {INDEX_NAME, "config.json"}:
            continue
        if len(relative.parts) == 1 and is_finished_mark(relative.name):
            continue
        if not path.is_dir():  # a broken link is kept here, so that the preflight names it
            copies.append(relative)
    return copies


@dataclass
class Source:
    """A HF checkpoint dir read for planning: config.json (if any), index, every shard's header."""

    path: Path
    config_text: str | None
    config: dict[str, Any]
    weight_map: dict[str, str]
    index_metadata: dict[str, object]
    headers: dict[str, ShardHeader]

    @classmethod
    def read(cls, src: Path, need_config: bool) -> Source:
        src = Path(src)
        if not src.is_dir():
            raise CastError(f"{src}: not a directory")
        config_path = src / "config.json"
        has_config = need_config or config_path.exists() or config_path.is_symlink()
        config_text, config = read_config(config_path) if has_config else (None, {})
        try:
            weight_map, index_metadata = load_index(src)
            missing = [name for name in sorted(set(weight_map.values())) if not (src / name).is_file()]
            if missing:
                raise CastError(f"{src}: {len(missing)} shard(s) listed in {INDEX_NAME} are missing: {', '.join(missing[:5])}")
            headers = {name: read_header(src / name) for name in sorted(set(weight_map.values()))}
        except SafetensorsError as exc:
            raise CastError(str(exc)) from exc
        return cls(src, config_text, config, weight_map, index_metadata, headers)

    def index_problems(self) -> list[str]:
        """Tensors the index maps to a shard that does not hold them."""
        return [f"{shard}: {INDEX_NAME} maps {tensor} here but the shard does not hold it"
                for tensor, shard in self.weight_map.items() if tensor not in self.headers[shard].tensors]

    def shard_facts(self) -> dict[str, list[int]]:
        """Each shard's size and mtime: what the identity of an output made from it records."""
        return {name: [h.file_size, (self.path / name).stat().st_mtime_ns] for name, h in self.headers.items()}


def raise_problems(problems: list[str], src: Path) -> None:
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CastError(f"{len(problems)} problem(s) in {src}, nothing written:\n  {shown}{more}")


def plan_cast(src: Path, dst: Path, options: CastOptions) -> CastPlan:
    """Read every header, find every scale, and check shapes; raise CastError listing all problems."""
    source = Source.read(src, need_config=False)
    src, dst, config, headers = source.path, Path(dst), source.config, source.headers
    config_path = src / "config.json"
    block = _block_size(config, config_path)
    num_layers = config.get("num_hidden_layers")
    if options.drop_mtp and not isinstance(num_layers, int):
        raise CastError(f"{src / 'config.json'}: --drop-mtp needs num_hidden_layers in config.json")

    problems = source.index_problems()
    shards = [
        _plan_shard(name, header, headers, source.weight_map, block, num_layers if options.drop_mtp else None, problems)
        for name, header in headers.items()
    ]
    raise_problems(problems, src)
    identity = {
        "tool": "convert fp8-bf16",
        "source": str(src.resolve()),
        "drop_mtp": options.drop_mtp,
        "shards": source.shard_facts(),
    }
    config_out = None if source.config_text is None else _output_config(source.config_text, config_path, options.drop_mtp)
    copies = files_to_copy(src, set(headers))
    return CastPlan(src, dst, shards, block, (src / INDEX_NAME).is_file(), source.index_metadata, config_out, copies, options, identity)


def _plan_shard(
    name: str,
    header: ShardHeader,
    headers: dict[str, ShardHeader],
    weight_map: dict[str, str],
    block: tuple[int, int],
    mtp_from_layer: int | None,
    problems: list[str],
) -> ShardJob:
    jobs = []
    for info in header.tensors.values():
        if info.name.endswith(SCALE_SUFFIX):
            continue
        layer = layer_index(info.name)
        if mtp_from_layer is not None and layer is not None and layer >= mtp_from_layer:
            continue
        if info.dtype != "F8_E4M3":
            jobs.append(TensorJob(OutputTensor(info.name, info.dtype, info.shape), info, header.path))
            continue
        scale_name = info.name + SCALE_SUFFIX
        scale_shard = weight_map.get(scale_name, name if scale_name in header.tensors else None)
        scale = headers[scale_shard].tensors.get(scale_name) if scale_shard in headers else None
        if scale is None:
            problems.append(f"{name}: tensor {info.name} is FP8 but {scale_name} is in no shard; the BF16 output would be wrong")
            continue
        if len(info.shape) != 2:
            problems.append(f"{name}: tensor {info.name} is FP8 with shape {list(info.shape)}; only 2-D block-quantised weights are supported")
            continue
        expected = list(scale_shape(info.shape, block))
        if scale.dtype != "F32" or list(scale.shape) != expected:
            problems.append(
                f"{scale_shard}: {scale_name} is {scale.dtype}{list(scale.shape)}, expected F32{expected} "
                f"for {info.name} {list(info.shape)} with {block[0]}x{block[1]} blocks"
            )
            continue
        jobs.append(TensorJob(OutputTensor(info.name, "BF16", info.shape), info, header.path, scale, headers[scale_shard].path))
    return make_shard(name, jobs)


def shard_is_done(dst: Path, shard: ShardJob) -> bool:
    return is_complete(dst / shard.name, shard.header, shard.output_size)
