"""Which megatron-core release a tree is, read from its package_info.py without importing it."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any


def megatron_version(path: Path) -> str | None:
    """megatron-core version from core/package_info.py at or above `path`, read without importing it."""
    for parent in [path.resolve(), *path.resolve().parents]:
        info = parent / "package_info.py"
        if parent.name == "core" and info.is_file():
            return _version_from_package_info(info.read_text(encoding="utf-8", errors="replace"))
    return None


def _version_from_package_info(source: str) -> str | None:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    constants: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    constants[target.id] = node.value.value
    if isinstance(constants.get("__version__"), str):
        return constants["__version__"]
    if all(key in constants for key in ("MAJOR", "MINOR", "PATCH")):
        return f"{constants['MAJOR']}.{constants['MINOR']}.{constants['PATCH']}{constants.get('PRE_RELEASE', '')}"
    return None
