"""Checks every converter runs before writing anything: where it writes, whether it fits, what it reads."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from toolkit.errors import ConvertError
from toolkit.hf_config import ConfigFormatError, top_level_members

SPACE_MARGIN = 64 * 1024 * 1024


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


def check_readable(paths: Iterable[Path]) -> None:
    """Refuse, listing every one, files that cannot be opened and read (a broken link, no permission)."""
    problems = []
    for path in paths:
        try:
            with open(path, "rb") as handle:
                handle.read(1)
        except OSError as exc:
            problems.append(f"{path}: {exc.strerror or exc}")
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ConvertError(f"{len(problems)} file(s) to copy cannot be read, nothing written:\n  {shown}")


def read_config(path: Path, needed: Iterable[str] = ()) -> tuple[str, dict[str, Any]]:
    """config.json as text and as a JSON object holding the `needed` keys; anything else is refused."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConvertError(f"{path}: missing; a HF model dir holds config.json") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConvertError(f"{path}: cannot be read ({exc})") from exc
    try:
        top_level_members(text)  # the JSON-object check patcher makes before it edits a config
    except ConfigFormatError as exc:
        raise ConvertError(f"{path}: {exc}") from exc
    config = json.loads(text)
    missing = [key for key in needed if key not in config]
    if missing:
        raise ConvertError(f"{path}: lacks {', '.join(missing)}")
    return text, config


def resolve_device(device: str) -> torch.device:
    """--device auto|cpu|cuda|cuda:N -> a torch device; refuse CUDA where none is visible."""
    if device == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConvertError(f"--device {device}: no CUDA device is visible; use --device cpu")
    return torch.device(device)
