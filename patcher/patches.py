"""The two patches (Megatron gpt_layer_specs.py, HF config.json) as objects: detect, apply, revert."""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from atomicio import atomic_write_bytes
from patcher import megatron_spec
from patcher.hf_config import ConfigEdit, ConfigFormatError, top_level_members

SPEC_RELATIVE = Path("core/models/gpt/gpt_layer_specs.py")
BACKUP_SUFFIX = ".orig"

NEEDS_PATCH = "needs-patch"
APPLIED = "applied"
NOT_NEEDED = "not-needed"
UNSUPPORTED = "unsupported"
EXIT_CODES = {APPLIED: 0, NOT_NEEDED: 0, NEEDS_PATCH: 1, UNSUPPORTED: 2}


class PatchError(Exception):
    """An expected failure: bad target, unsupported file, refused revert. Exit code 2."""


class ReadOnlyTargetError(PatchError):
    """The file to patch has no write bit; the message says what to do."""


def ensure_writable(path: Path) -> None:
    """Refuse a file whose mode has no write bit, even for root, before anything is written."""
    if path.exists() and not path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        raise ReadOnlyTargetError(
            f"{path} is read-only (mode {stat.S_IMODE(path.stat().st_mode):o}); "
            f"make it writable (chmod u+w '{path}') or patch a copy of it"
        )


@dataclass
class Status:
    """What `patcher status` reports for one target."""

    target: str
    path: str
    state: str
    message: str
    version: str | None = None
    sites: list[dict[str, Any]] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    backup: str | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.state]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "exit_code": self.exit_code}


@dataclass
class Outcome:
    """What apply or revert did (or would do, on a dry run)."""

    path: str
    changed: bool
    message: str
    diff: str = ""


def unified_diff(before: str, after: str, path: Path) -> str:
    return "".join(
        difflib.unified_diff(
            before.splitlines(keepends=True), after.splitlines(keepends=True), f"a/{path}", f"b/{path}"
        )
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PatchError(f"{path}: not a UTF-8 text file (byte {exc.start}); give the path of a source or config file") from exc
    except OSError as exc:
        raise PatchError(f"{path}: cannot read ({exc.strerror})") from exc


class _BackedUpPatch:
    """Shared apply/revert: the original bytes are kept once as `<file>.orig` for an exact revert."""

    name = ""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def backup_path(self) -> Path:
        return self.path.with_name(self.path.name + BACKUP_SUFFIX)

    def transform(self, text: str) -> str:
        raise NotImplementedError

    def is_own_result(self, original: str, current: str) -> bool:
        """Whether `current` is what this patch makes of `original`."""
        return self.transform(original) == current

    def detect(self) -> Status:
        raise NotImplementedError

    def apply(self, dry_run: bool = False) -> Outcome:
        status = self.detect()
        if status.state == UNSUPPORTED:
            raise PatchError(status.message)
        if status.state != NEEDS_PATCH:
            return Outcome(str(self.path), False, f"nothing to do: {status.message}")
        before = _read_text(self.path)
        after = self.transform(before)
        diff = unified_diff(before, after, self.path)
        if dry_run:
            return Outcome(str(self.path), False, f"dry run: {self.name} would change {self.path}", diff)
        ensure_writable(self.path)
        mode = self.path.stat().st_mode & 0o7777
        backup = self.backup_path
        if not backup.exists() or backup.read_bytes() != before.encode("utf-8"):
            atomic_write_bytes(backup, before.encode("utf-8"), mode)
        atomic_write_bytes(self.path, after.encode("utf-8"), mode)
        return Outcome(str(self.path), True, f"patched {self.path} (original kept as {backup.name})", diff)

    def revert(self, dry_run: bool = False, force: bool = False) -> Outcome:
        backup = self.backup_path
        if not backup.exists():
            return Outcome(str(self.path), False, f"nothing to revert: no {backup.name} beside {self.path}")
        current = _read_text(self.path)
        original = _read_text(backup)
        if current != original and not self.is_own_result(original, current) and not force:
            raise PatchError(
                f"{self.path} changed since it was patched (it is neither the original in {backup.name} "
                "nor the patched form of it); nothing restored. Re-run with --force to restore "
                f"{backup.name} anyway, or delete {backup.name} to keep the current file"
            )
        diff = unified_diff(current, original, self.path)
        if dry_run:
            return Outcome(str(self.path), False, f"dry run: would restore {self.path} from {backup.name}", diff)
        atomic_write_bytes(self.path, backup.read_bytes(), backup.stat().st_mode & 0o7777)
        backup.unlink()
        return Outcome(str(self.path), True, f"restored the original bytes of {self.path}", diff)


def megatron_version(spec_path: Path) -> str | None:
    """megatron-core version from the package_info.py beside the spec, read without importing it."""
    for parent in spec_path.resolve().parents:
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


class MegatronSpecPatch(_BackedUpPatch):
    """MLA q/kv down projections: duplicated `backend.linear()` / `TELinear` -> column-parallel."""

    name = "megatron-mla-column-parallel-down-proj"

    def transform(self, text: str) -> str:
        return megatron_spec.rewrite(text)

    def detect(self) -> Status:
        version = megatron_version(self.path)
        base = {"target": "megatron", "path": str(self.path), "version": version}
        if self.path.suffix != ".py":
            return Status(**base, state=UNSUPPORTED, message=f"{self.path}: not a Python file; give gpt_layer_specs.py or a Megatron tree")
        try:
            report = megatron_spec.scan(_read_text(self.path))
        except (megatron_spec.SpecParseError, PatchError) as exc:
            return Status(**base, state=UNSUPPORTED, message=f"{self.path}: {exc}")
        sites = [{**asdict(site), "replacement": site.replacement} for site in report.sites]
        backup = str(self.backup_path) if self.backup_path.exists() else None
        if report.calls == 0:
            return Status(
                **base,
                state=UNSUPPORTED,
                message=f"{self.path}: no {megatron_spec.SUBMODULES_CLASS}(...) call found; "
                "this is not a Megatron gpt_layer_specs.py with Multi-Latent Attention (or its builders were renamed)",
            )
        unrecognised = [site for site in report.sites if site.state == megatron_spec.UNRECOGNISED]
        if report.problems or unrecognised:
            found = report.problems + [
                f"line {s.line} ({s.function}): {s.argument}={s.expression} is not a form this patcher knows" for s in unrecognised
            ]
            return Status(
                **base,
                state=UNSUPPORTED,
                sites=sites,
                message=f"{self.path}: unrecognised MLA structure, nothing written:\n  " + "\n  ".join(found),
            )
        duplicated = [site for site in report.sites if site.state == megatron_spec.NEEDS_PATCH]
        if duplicated:
            lines = ", ".join(str(site.line) for site in duplicated)
            return Status(
                **base,
                state=NEEDS_PATCH,
                sites=sites,
                backup=backup,
                message=f"{len(duplicated)} duplicated down projection(s) at line(s) {lines} must become column-parallel",
            )
        if backup and self.is_own_result(_read_text(self.backup_path), _read_text(self.path)):
            return Status(**base, state=APPLIED, sites=sites, backup=backup, message="patch applied: every MLA down projection is column-parallel")
        return Status(
            **base,
            state=NOT_NEEDED,
            sites=sites,
            backup=backup,
            message="not needed: this release already builds column-parallel MLA down projections",
        )


class HFConfigPatch(_BackedUpPatch):
    """config.json: drop quantization_config, set num_nextn_predict_layers to 0 (unless keep_mtp)."""

    name = "hf-config-bf16-no-mtp"

    def __init__(self, path: Path, keep_mtp: bool = False) -> None:
        super().__init__(path)
        self.edit = ConfigEdit(drop_quantization=True, disable_mtp=not keep_mtp)

    def transform(self, text: str) -> str:
        return self.edit.apply(text)

    def is_own_result(self, original: str, current: str) -> bool:
        return any(ConfigEdit(disable_mtp=flag).apply(original) == current for flag in (True, False))

    def detect(self) -> Status:
        base = {"target": "hf-config", "path": str(self.path)}
        try:
            text = _read_text(self.path)
            top_level_members(text)
        except (PatchError, ConfigFormatError) as exc:
            return Status(**base, state=UNSUPPORTED, message=f"{self.path}: malformed config.json: {exc}")
        config = json.loads(text)
        base["version"] = config.get("model_type")
        backup = str(self.backup_path) if self.backup_path.exists() else None
        changes = self.edit.changes(config)
        if changes:
            return Status(**base, state=NEEDS_PATCH, changes=changes, backup=backup, message="; ".join(changes))
        if backup and self.is_own_result(_read_text(self.backup_path), text):
            return Status(**base, state=APPLIED, backup=backup, message="patch applied: no quantization_config, MTP as requested")
        present = [key for key in ("quantization_config", "num_nextn_predict_layers") if key in config]
        detail = "num_nextn_predict_layers is already 0" if present else "it has neither quantization_config nor num_nextn_predict_layers"
        return Status(**base, state=NOT_NEEDED, backup=backup, message=f"not needed: {detail}")


def installed_megatron_spec() -> Path:
    """gpt_layer_specs.py of the megatron-core that `import megatron.core` would load."""
    try:
        spec = importlib.util.find_spec("megatron.core")
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.origin:
        raise PatchError("megatron-core is not importable in this Python; give the path of a Megatron tree")
    return Path(spec.origin).parent / SPEC_RELATIVE.relative_to("core")


def resolve(path: Path | None, keep_mtp: bool = False) -> MegatronSpecPatch | HFConfigPatch:
    """Pick the patch for PATH: a spec file, a Megatron tree (checkout, package, site-packages), or a HF dir."""
    if path is None:
        return MegatronSpecPatch(installed_megatron_spec())
    path = Path(path)
    if not path.exists():
        raise PatchError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix == ".json":
            return HFConfigPatch(path, keep_mtp)
        return MegatronSpecPatch(path)
    if (path / "config.json").is_file():
        return HFConfigPatch(path / "config.json", keep_mtp)
    for candidate in (path / "megatron" / SPEC_RELATIVE, path / SPEC_RELATIVE, path / "models/gpt/gpt_layer_specs.py", path / "gpt_layer_specs.py"):
        if candidate.is_file():
            return MegatronSpecPatch(candidate)
    raise PatchError(
        f"{path}: neither a HF model dir (no config.json) nor a Megatron tree "
        f"(no megatron/{SPEC_RELATIVE} inside); give a Megatron-LM checkout, its megatron/ dir, "
        "a site-packages dir, gpt_layer_specs.py itself, or a HF model dir"
    )
