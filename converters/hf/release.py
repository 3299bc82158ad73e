"""A DeepSeek FP8 release read for its layout (`--like RELEASE_DIR`): which tensors are e4m3, which shard holds
each tensor, its quantization_config and block size, and where each scale_inv is. Only the index, the headers,
config.json and (when asked) scale_inv tensors are read; never a weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converters.preflight import read_config
from kernels.fp8 import DEFAULT_BLOCK
from toolkit.errors import ConvertError
from toolkit.safetensors_index import SafetensorsError, ShardHeader, TensorInfo, load_index, read_header

SCALE_SUFFIX = "_scale_inv"
# DeepSeek-V3's (V3-0324's, R1's) quantization_config, written when no --like release gives its own
RELEASE_QUANTIZATION = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


@dataclass
class ReleaseLayout:
    """What `--like RELEASE_DIR` gives: the release's index and headers (no weights are read but its scale_inv)."""

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
        if not release.fp8_names():
            raise ConvertError(f"--like {path}: holds no F8_E4M3 tensor; give the FP8 release the model came from")
        fmt = release.quantization.get("scale_fmt")
        if fmt not in (None, "float32", "fp32"):
            raise ConvertError(f"--like {path}: quantization_config.scale_fmt is {fmt!r} (DeepSeek-V3.1's power-of-two scales); "
                            "only the V3/R1 recipe (scale = block amax / 448, float32) is written")
        return release

    @property
    def quantization(self) -> dict[str, Any]:
        quantization = self.config.get("quantization_config")
        return quantization if isinstance(quantization, dict) else {}

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

    def mismatch(self, name: str, shape: tuple[int, ...]) -> str | None:
        """Why the release's tensor `name` cannot be this one (another shape), or None."""
        theirs = self.info(name)
        if theirs is not None and tuple(theirs.shape) != tuple(shape):
            return f"{name} is {list(shape)} here but {list(theirs.shape)} in the release {self.path}: --like names another model?"
        return None
