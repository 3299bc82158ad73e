"""What a PATH given to `patcher` is: a Megatron tree (checkout, package, site-packages, one of its files),
a lone source file, or a HF model dir; and where the installed megatron-core is."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from patcher.config_patch import HFConfigPatch
from patcher.megatron_tree import MLA_RELATIVE, QK_NORM_RELATIVE, SPEC_RELATIVE, TE_RELATIVE, MegatronTree
from patcher.states import PatchError


def installed_megatron_root() -> Path:
    """The `megatron` package dir that `import megatron.core` would load."""
    try:
        spec = importlib.util.find_spec("megatron.core")
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.origin:
        raise PatchError("megatron-core is not importable in this Python; give the path of a Megatron tree")
    return Path(spec.origin).parent.parent


def installed_megatron_spec() -> Path:
    """gpt_layer_specs.py of the megatron-core that `import megatron.core` would load."""
    return installed_megatron_root() / SPEC_RELATIVE


def _tree_root_of_file(path: Path) -> Path | None:
    """The `megatron` dir above a file that sits at one of the patched places inside it."""
    resolved = path.resolve()
    for relative in (SPEC_RELATIVE, TE_RELATIVE, MLA_RELATIVE, QK_NORM_RELATIVE):
        if resolved.parts[-len(relative.parts) :] == relative.parts:
            root = resolved.parents[len(relative.parts) - 1]
            if (root / "core" / "package_info.py").is_file() or (root / SPEC_RELATIVE).is_file():
                return root
    return None


def resolve(path: Path | None, keep_mtp: bool = False) -> MegatronTree | HFConfigPatch:
    """Pick the target for PATH: a Megatron tree (checkout, package, site-packages, one of its files) or a HF dir."""
    if path is None:
        return MegatronTree.at(installed_megatron_root())
    path = Path(path)
    if not os.path.lexists(path):
        raise PatchError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix == ".json":
            return HFConfigPatch(path, keep_mtp)
        root = _tree_root_of_file(path)
        return MegatronTree.at(root) if root is not None else MegatronTree.lone_file(path)
    if (path / "config.json").is_file():
        return HFConfigPatch(path / "config.json", keep_mtp)
    for root in (path / "megatron", path, path.parent):
        if (root / SPEC_RELATIVE).is_file():
            return MegatronTree.at(root)
    raise PatchError(
        f"{path}: neither a HF model dir (no config.json) nor a Megatron tree "
        f"(no megatron/{SPEC_RELATIVE} inside); give a Megatron-LM checkout, its megatron/ dir, "
        "a site-packages dir, one of its files, or a HF model dir"
    )
