"""The config.json patch of a HF model dir: no quantization_config, no MTP; refused while the weights are FP8."""

from __future__ import annotations

import json
from pathlib import Path

from patcher.backup import BackedUpPatch, read_text, unified_diff
from patcher.states import APPLIED, NEEDS_PATCH, NOT_NEEDED, UNSUPPORTED, Outcome, PatchError, Status
from toolkit.hf_config import ConfigEdit, ConfigFormatError, top_level_members
from toolkit.safetensors_index import INDEX_NAME, SafetensorsError, load_index, read_header

FP8_MESSAGE = "this checkpoint is FP8; run `convert fp8-bf16` first"


class HFConfigPatch(BackedUpPatch):
    """config.json: drop quantization_config, set num_nextn_predict_layers to 0 (unless keep_mtp)."""

    name = "hf-config-bf16-no-mtp"
    target = "hf-config"

    def __init__(self, path: Path, keep_mtp: bool = False) -> None:
        super().__init__(path)
        self.edit = ConfigEdit(drop_quantization=True, disable_mtp=not keep_mtp)

    def transform(self, text: str) -> str:
        return self.edit.apply(text)

    def is_own_result(self, original: str, current: str) -> bool:
        return any(ConfigEdit(disable_mtp=flag).apply(original) == current for flag in (True, False))

    def detect(self) -> Status:
        base = {"target": self.target, "path": str(self.path)}
        try:
            text = read_text(self.path)
            top_level_members(text)
        except (PatchError, ConfigFormatError) as exc:
            return Status(**base, state=UNSUPPORTED, message=f"{self.path}: malformed config.json: {exc}")
        config = json.loads(text)
        base["version"] = config.get("model_type")
        backup = str(self.backup_path) if self.has_backup() else None
        changes = self.edit.changes(config)
        if changes and "quantization_config" in config:
            fp8 = fp8_evidence(self.path.parent)
            if fp8:
                return Status(**base, state=UNSUPPORTED, changes=changes, message=f"{self.path.parent}: {FP8_MESSAGE} ({fp8})")
        if changes:
            return Status(**base, state=NEEDS_PATCH, changes=changes, backup=backup, message="; ".join(changes))
        if backup and self.applied_here():
            return Status(**base, state=APPLIED, backup=backup, message="patch applied: no quantization_config, MTP as requested")
        present = [key for key in ("quantization_config", "num_nextn_predict_layers") if key in config]
        detail = "num_nextn_predict_layers is already 0" if present else "it has neither quantization_config nor num_nextn_predict_layers"
        return Status(**base, state=NOT_NEEDED, backup=backup, message=f"not needed: {detail}")

    def apply(self, dry_run: bool = False) -> Outcome:
        status = self.detect()
        if status.state == UNSUPPORTED:
            raise PatchError(status.message)
        if status.state != NEEDS_PATCH:
            return Outcome(str(self.path), False, f"nothing to do: {status.message}")
        before, after = self.planned_change()
        diff = unified_diff(before, after, self.path)
        if dry_run:
            return Outcome(str(self.path), False, f"dry run: {self.name} would change {self.path}", diff)
        self.write(before, after)
        return Outcome(str(self.path), True, f"patched {self.path} (original kept as {self.backup_path.name})", diff)

    def revert(self, dry_run: bool = False, force: bool = False) -> Outcome:
        texts = self.check_revert(force)
        if texts is None:
            return Outcome(str(self.path), False, f"nothing to revert: no {self.backup_path.name} beside {self.path}")
        diff = unified_diff(*texts, self.path)
        if dry_run:
            return Outcome(str(self.path), False, f"dry run: would restore {self.path} from {self.backup_path.name}", diff)
        self.restore()
        return Outcome(str(self.path), True, f"restored the original bytes of {self.path}", diff)


def fp8_evidence(model_dir: Path) -> str | None:
    """Why `model_dir` still holds FP8 weights (an index listing *_scale_inv, or float8 tensors), or None."""
    try:
        weight_map, _ = load_index(model_dir)
    except SafetensorsError:
        return None  # no weights beside config.json (a config-only dir): nothing to protect
    if not any(model_dir.glob("*.safetensors")):
        return None  # an index without any shards (the tensor names verl's weight sync reads): no weights to misread
    scales = [name for name in weight_map if name.endswith("_scale_inv")]
    if scales:
        return f"{INDEX_NAME} lists {len(scales)} *_scale_inv tensors, e.g. {scales[0]}"
    for shard in sorted(set(weight_map.values())):
        try:
            header = read_header(model_dir / shard)
        except SafetensorsError:
            continue
        fp8 = [info for info in header.tensors.values() if info.dtype.startswith("F8_")]
        if fp8:
            return f"{shard} holds {len(fp8)} float8 tensors, e.g. {fp8[0].name} ({fp8[0].dtype})"
    return None
