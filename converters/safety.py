"""Checks every converter runs before writing anything: where it writes, and whether it fits."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

SPACE_MARGIN = 64 * 1024 * 1024


class ConvertError(Exception):
    """An expected failure (bad input, unsafe request); the message says what and what to do."""


def check_paths(src: Path, dst: Path) -> None:
    """Refuse a destination equal to, inside, or containing the source."""
    src_real, dst_real = Path(src).resolve(), Path(dst).resolve()
    if dst_real == src_real:
        raise ConvertError(f"--dst {dst} is the source directory; choose a new directory")
    if dst_real.is_relative_to(src_real):
        raise ConvertError(f"--dst {dst} is inside the source {src}; choose a directory outside it")
    if src_real.is_relative_to(dst_real):
        raise ConvertError(f"--dst {dst} contains the source {src}; choose a directory that does not")


def check_free_space(dst: Path, needed: int, what: str) -> None:
    """Refuse when the filesystem holding `dst` has less than `needed` bytes (plus a margin) free."""
    probe = Path(dst)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed + SPACE_MARGIN > free:
        raise ConvertError(
            f"not enough space on {dst}: {(needed + SPACE_MARGIN) / 1e9:.2f} GB needed for {what}, "
            f"{free / 1e9:.2f} GB free; free space or choose another --dst"
        )


def resolve_device(device: str) -> torch.device:
    """--device auto|cpu|cuda|cuda:N -> a torch device; refuse CUDA where none is visible."""
    if device == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConvertError(f"--device {device}: no CUDA device is visible; use --device cpu")
    return torch.device(device)
