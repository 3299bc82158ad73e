"""DeepSeek's FP8 release format, decided once for `convert bf16-fp8` and `convert mcore-hf --fp8`.

`ReleaseLayout` is a release read for its layout (`--like RELEASE_DIR`): which tensors are e4m3, which shard
holds each tensor, its quantization_config and block size, where each scale_inv is. Only the index, the
headers, config.json and (when asked) scale_inv tensors are read; never a weight. `fp8_layout` decides, for
the tensors a model has, which are quantised (the model description's choice, or the release's), each one's
shape checks, the release's scale to keep, and with --like each output's shard: one rule for both commands.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from converters.hf.checkpoint import SCALE_SUFFIX, layer_index
from converters.hf.safetensors_io import DTYPES, OutputTensor
from converters.mcore.params import release_fp8_names
from converters.preflight import read_config
from kernels.fp8 import DEFAULT_BLOCK, QUANTISABLE_DTYPES, scale_shape
from toolkit.errors import ConvertError
from toolkit.safetensors_index import INDEX_NAME, SafetensorsError, ShardHeader, TensorInfo, load_index, read_header

# DeepSeek-V3's (V3-0324's, R1's) quantization_config, written when no --like release gives its own
RELEASE_QUANTIZATION = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


@dataclass
class ReleaseLayout:
    """What `--like RELEASE_DIR` gives: the release's index, headers and config.json."""

    path: Path
    weight_map: dict[str, str]
    headers: dict[str, ShardHeader]
    config: dict[str, Any]

    @classmethod
    def read(cls, path: Path) -> ReleaseLayout:
        path = Path(path)
        if not path.is_dir():
            raise ConvertError(f"--like {path}: not a directory")
        _, config = read_config(path / "config.json")
        try:
            weight_map, _ = load_index(path)
            headers = {name: read_header(path / name) for name in sorted(set(weight_map.values()))}
        except (SafetensorsError, OSError) as exc:
            raise ConvertError(f"--like {path}: {exc}") from exc
        release = cls(path, weight_map, headers, config)
        quantization = release.quantization
        if quantization.get("quant_method") != "fp8" or quantization.get("fmt", "e4m3") != "e4m3":
            raise ConvertError(f"--like {path / 'config.json'}: quantization_config is {quantization or 'missing'}; expected DeepSeek's "
                               "FP8 release (quant_method fp8, fmt e4m3)")
        fmt = quantization.get("scale_fmt")
        if fmt not in (None, "float32", "fp32"):
            raise ConvertError(f"--like {path}: quantization_config.scale_fmt is {fmt!r} (DeepSeek-V3.1's power-of-two scales); "
                               "only the V3/R1 recipe (scale = block amax / 448, float32) is written")
        if not release.fp8_names():
            raise ConvertError(f"--like {path}: holds no F8_E4M3 tensor; give the FP8 release the model came from")
        release.block()  # refuses a malformed weight_block_size now, before anything is written
        return release

    def refuse_overlap(self, dst: Path) -> None:
        """The output must not be, hold or sit in the release (--overwrite there would remove its shards)."""
        mine, theirs = Path(dst).resolve(), self.path.resolve()
        if mine == theirs or mine.is_relative_to(theirs) or theirs.is_relative_to(mine):
            raise ConvertError(f"--dst {dst} and --like {self.path} overlap: writing there could remove the release's own files; "
                               "choose another --dst")

    @property
    def quantization(self) -> dict[str, Any]:
        quantization = self.config.get("quantization_config")
        return quantization if isinstance(quantization, dict) else {}

    def identity(self) -> list[object]:
        """What must not change for a run --like this release to resume or count as done: its path, index, config."""
        files = [self.path / INDEX_NAME, self.path / "config.json"]
        return [str(self.path.resolve()), *([p.stat().st_size, p.stat().st_mtime_ns] if p.exists() else [0, 0] for p in files)]

    def info(self, name: str) -> TensorInfo | None:
        shard = self.weight_map.get(name)
        return None if shard is None else self.headers[shard].tensors.get(name)

    def fp8_names(self) -> set[str]:
        return {name for header in self.headers.values() for name, info in header.tensors.items() if info.dtype == "F8_E4M3"}

    def block(self) -> tuple[int, int]:
        block = self.quantization.get("weight_block_size", list(DEFAULT_BLOCK))
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(size, int) and size > 0 for size in block)):
            raise ConvertError(f"--like {self.path / 'config.json'}: quantization_config.weight_block_size is {block!r}, expected [128, 128]")
        return (block[0], block[1])

    def scale(self, name: str, grid: tuple[int, int]) -> tuple[TensorInfo, Path] | None:
        """The release's scale_inv of weight `name` and its file, if it has one of this block grid."""
        info = self.info(name + SCALE_SUFFIX)
        if info is None or info.dtype != "F32" or tuple(info.shape) != tuple(grid):
            return None
        return info, self.path / self.weight_map[name + SCALE_SUFFIX]


@dataclass(frozen=True)
class FP8Tensor:
    """One of the model's tensors in the release format: written as it is, or quantised to e4m3 `codes` plus
    `scale` (scale_inv). With --like, `shards` names the release's shard of each output (codes and scale may
    differ); `prior` is the release's scale_inv, kept for every block it still reproduces."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    block: tuple[int, int] | None = None  # quantised when set
    prior: tuple[TensorInfo, Path] | None = None
    shards: tuple[str, ...] = ()  # with --like: one per output

    @property
    def outputs(self) -> tuple[OutputTensor, ...]:
        if self.block is None:
            return (OutputTensor(self.name, self.dtype, self.shape),)
        return (OutputTensor(self.name, "F8_E4M3", self.shape), OutputTensor(self.name + SCALE_SUFFIX, "F32", scale_shape(self.shape, self.block)))


@dataclass
class FP8Layout:
    tensors: list[FP8Tensor]
    quantization: dict[str, Any]  # config.json's quantization_config
    block: tuple[int, int]


def fp8_layout(tensors: dict[str, tuple[str, tuple[int, ...]]], config: dict[str, Any], mtp_layers: int,
               release: ReleaseLayout | None, where: Path) -> FP8Layout:
    """The release format of a model whose tensors (name -> safetensors dtype, shape) are given, with `mtp_layers`
    MTP layers: the release's choice of quantised tensors (--like) or the model description's, checked; raises
    ConvertError listing every problem. `where` names the model's files in messages."""
    layers = config["num_hidden_layers"]
    if release is not None:
        # the release's MTP layers are the model's only if config.json (and --drop-mtp) keep them
        chosen = {name for name in release.fp8_names() if (layer_index(name) or 0) < layers + mtp_layers}
        whose = f"the release {release.path} quantises"
    else:
        chosen = release_fp8_names(config, mtp_layers)
        whose = "config.json's model quantises"
    block = release.block() if release else DEFAULT_BLOCK
    problems = []
    absent = sorted(chosen - set(tensors))
    if absent:
        hint = "; config.json declares MTP layers the source lacks: --drop-mtp leaves them out" if any(
            (layer_index(name) or 0) >= layers for name in absent) else ""
        problems.append(f"{len(absent)} tensor(s) {whose} are not in {where}: {', '.join(absent[:5])}{hint}")
    out = []
    for name, (dtype, shape) in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            problems.append(f"{where}: {name} is a scale_inv: the source is (partly) FP8 already; give a BF16 checkpoint")
            continue
        theirs = release.info(name) if release else None
        if theirs is not None and tuple(theirs.shape) != tuple(shape):
            problems.append(f"{name} is {list(shape)} here but {list(theirs.shape)} in the release {release.path}: --like names another model?")
            continue
        if name not in chosen:
            tensor = FP8Tensor(name, dtype, shape)
        elif len(shape) != 2 or DTYPES.get(dtype) not in QUANTISABLE_DTYPES:
            problems.append(f"{where}: {name} is {dtype}{list(shape)}; a quantised tensor must be a 2-D BF16/F16/F32 weight")
            continue
        else:
            tensor = FP8Tensor(name, dtype, shape, block, release.scale(name, scale_shape(shape, block)) if release else None)
        if release is not None:
            shards = tuple(release.weight_map.get(output.name) or release.weight_map.get(name) for output in tensor.outputs)
            if None in shards:
                problems.append(f"{name} is not in the release's index ({release.path / INDEX_NAME}): --like names another model?")
                continue
            tensor = replace(tensor, shards=shards)
        out.append(tensor)
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ConvertError(f"{len(problems)} problem(s), nothing written:\n  {shown}{more}")
    return FP8Layout(out, release.quantization if release else RELEASE_QUANTIZATION, block)
