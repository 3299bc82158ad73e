"""The patches as objects: three Megatron source codemods grouped per Megatron tree, and config.json.

Megatron (one file each, all libcst codemods, each kept once as `<file>.orig` for an exact revert):
  export-flag    extensions/transformer_engine.py   duplicated TELinear weights marked not TP-split
  rope-gradient  transformer/multi_latent_attention.py  k_pos_emb gradient summed over TP ranks
  seed-edit      models/gpt/gpt_layer_specs.py       the how-to's column-parallel down projections
Which of them a tree needs follows from its release and layout (`MegatronTree.patch_states`).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from atomicio import atomic_write_bytes, fsync_dir
from patcher import megatron_spec, mla_rope_grad, te_export_flag
from patcher.cst_util import SourceParseError
from toolkit.hf_config import ConfigEdit, ConfigFormatError, top_level_members

SPEC_RELATIVE = Path("core/models/gpt/gpt_layer_specs.py")
TE_RELATIVE = Path("core/extensions/transformer_engine.py")
MLA_RELATIVE = Path("core/transformer/multi_latent_attention.py")
BACKUP_SUFFIX = ".orig"

# overall states (and exit codes of `patcher status`)
NEEDS_PATCH = "needs-patch"
APPLIED = "applied"
NOT_NEEDED = "not-needed"
UNSUPPORTED = "unsupported"
EXIT_CODES = {APPLIED: 0, NOT_NEEDED: 0, NEEDS_PATCH: 1, UNSUPPORTED: 2}

# one Megatron patch's state in its tree
NEEDED = "needed"  # this release/layout needs it and it is missing: `patcher apply` adds it
UPSTREAM = "upstream"  # the release already has the change
ON_REQUEST = "on-request"  # only with --seed-edit
PATCH_EXIT = {NEEDED: NEEDS_PATCH, APPLIED: APPLIED, UPSTREAM: NOT_NEEDED, NOT_NEEDED: NOT_NEEDED, ON_REQUEST: NOT_NEEDED}

EXPORT_FLAG = "export-flag"
ROPE_GRADIENT = "rope-gradient"
SEED_EDIT = "seed-edit"

FP8_MESSAGE = "this checkpoint is FP8; run `convert fp8-bf16` first"


class PatchError(Exception):
    """An expected failure: bad target, unsupported file, refused revert. Exit code 2."""


class ReadOnlyTargetError(PatchError):
    """The file to patch has no write bit; the message says what to do."""


def ensure_writable(path: Path) -> None:
    """Refuse a file whose mode has no write bit, even for root, before anything is written.

    A symlink passes: an atomic write replaces the link itself and never writes its target.
    """
    if not path.is_symlink() and path.exists() and not path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        raise ReadOnlyTargetError(
            f"{path} is read-only (mode {stat.S_IMODE(path.stat().st_mode):o}); "
            f"make it writable (chmod u+w '{path}') or patch a copy of it"
        )


@dataclass
class PatchState:
    """One Megatron patch in one tree: what it changes, its state there, and why."""

    name: str
    path: str
    state: str
    message: str
    line: int | None = None
    backup: str | None = None


@dataclass
class Status:
    """What `patcher status` reports for one target."""

    target: str
    path: str
    state: str
    message: str
    version: str | None = None
    patches: list[dict[str, Any]] = field(default_factory=list)
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
    """One file's edit; the original is kept once as `<file>.orig` for an exact revert.

    A file that is a symlink (Hugging Face hub snapshots link into blobs/) is never written
    through: the link itself becomes `<file>.orig` and a regular file takes its place, so the blob
    stays intact and `revert` puts the link back.
    """

    name = ""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def backup_path(self) -> Path:
        return self.path.with_name(self.path.name + BACKUP_SUFFIX)

    def has_backup(self) -> bool:
        return os.path.lexists(self.backup_path)

    def transform(self, text: str) -> str:
        raise NotImplementedError

    def is_own_result(self, original: str, current: str) -> bool:
        """Whether `current` is what this patch makes of `original`."""
        return self.transform(original) == current

    def original_text(self) -> str:
        """The file as shipped: the backup if this patch made one, else the file itself."""
        return _read_text(self.backup_path if self.has_backup() else self.path)

    def applied_here(self) -> bool:
        return self.has_backup() and self.is_own_result(_read_text(self.backup_path), _read_text(self.path))

    def planned_change(self) -> tuple[str, str]:
        before = _read_text(self.path)
        return before, self.transform(before)

    def write(self, before: str, after: str) -> None:
        ensure_writable(self.path)
        mode = self.path.stat().st_mode & 0o7777
        backup = self.backup_path
        if self.path.is_symlink():
            _replace_with_link(backup, os.readlink(self.path))
        elif not backup.exists() or backup.read_bytes() != before.encode("utf-8"):
            atomic_write_bytes(backup, before.encode("utf-8"), mode)
        atomic_write_bytes(self.path, after.encode("utf-8"), mode)

    def check_revert(self, force: bool) -> tuple[str, str] | None:
        """(current, original) texts if a revert may proceed, None without a backup; raises if refused."""
        if not self.has_backup():
            return None
        current = _read_text(self.path)
        original = _read_text(self.backup_path)
        if current != original and not self.is_own_result(original, current) and not force:
            raise PatchError(
                f"{self.path} changed since it was patched (it is neither the original in {self.backup_path.name} "
                "nor the patched form of it); nothing restored. Re-run with --force to restore "
                f"{self.backup_path.name} anyway, or delete {self.backup_path.name} to keep the current file"
            )
        return current, original

    def restore(self) -> None:
        backup = self.backup_path
        if backup.is_symlink():
            os.replace(backup, self.path)
            fsync_dir(self.path.parent)
            return
        atomic_write_bytes(self.path, backup.read_bytes(), backup.stat().st_mode & 0o7777)
        backup.unlink()


def _replace_with_link(path: Path, target: str) -> None:
    temporary = path.with_name(f".{path.name}.link.tmp")
    if os.path.lexists(temporary):
        temporary.unlink()
    os.symlink(target, temporary)
    os.replace(temporary, path)
    fsync_dir(path.parent)


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


@dataclass(frozen=True)
class FileState:
    """A codemod's reading of one file: needs-patch, applied (by us), present (upstream) or unsupported."""

    state: str
    message: str
    line: int | None = None


class CodemodPatch(_BackedUpPatch):
    """A libcst codemod (a module with `scan` and `rewrite`) on one Megatron source file."""

    codemod: ModuleType
    relative: Path

    def transform(self, text: str) -> str:
        return self.codemod.rewrite(text)

    def file_state(self) -> FileState:
        if not self.path.is_file():
            return FileState(UNSUPPORTED, f"{self.path}: missing; is this a complete Megatron tree?")
        try:
            report = self.codemod.scan(_read_text(self.path))
        except (SourceParseError, PatchError) as exc:
            return FileState(UNSUPPORTED, f"{self.path}: {exc}")
        where = f"{self.path}" + (f":{report.line}" if report.line else "")
        if report.state == self.codemod.UNRECOGNISED:
            return FileState(UNSUPPORTED, f"{where}: unrecognised structure, nothing written: {report.detail}", report.line)
        if report.state == self.codemod.PRESENT:
            if self.applied_here():
                return FileState(APPLIED, f"applied by patcher: {report.detail}", report.line)
            return FileState("present", report.detail, report.line)
        return FileState(NEEDS_PATCH, report.detail, report.line)


class ExportFlagPatch(CodemodPatch):
    name = EXPORT_FLAG
    codemod = te_export_flag
    relative = TE_RELATIVE


class RopeGradientPatch(CodemodPatch):
    name = ROPE_GRADIENT
    codemod = mla_rope_grad
    relative = MLA_RELATIVE


class MegatronSpecPatch(_BackedUpPatch):
    """The how-to's edit: MLA q/kv down projections `backend.linear()` / `TELinear` -> column-parallel."""

    name = SEED_EDIT
    relative = SPEC_RELATIVE

    def transform(self, text: str) -> str:
        return megatron_spec.rewrite(text)

    def report(self, text: str | None = None) -> megatron_spec.SpecReport:
        """Scan the file (or `text`); raises PatchError on anything this patcher does not recognise."""
        if self.path.suffix != ".py":
            raise PatchError(f"{self.path}: not a Python file; give gpt_layer_specs.py or a Megatron tree")
        try:
            report = megatron_spec.scan(_read_text(self.path) if text is None else text)
        except SourceParseError as exc:
            raise PatchError(f"{self.path}: {exc}") from exc
        if report.calls == 0:
            raise PatchError(
                f"{self.path}: no {megatron_spec.SUBMODULES_CLASS}(...) call found; "
                "this is not a Megatron gpt_layer_specs.py with Multi-Latent Attention (or its builders were renamed)"
            )
        unrecognised = [site for site in report.sites if site.state == megatron_spec.UNRECOGNISED]
        if report.problems or unrecognised:
            found = report.problems + [
                f"line {s.line} ({s.function}): {s.argument}={s.expression} is not a form this patcher knows" for s in unrecognised
            ]
            raise PatchError(f"{self.path}: unrecognised MLA structure, nothing written:\n  " + "\n  ".join(found))
        return report

    def sites(self) -> list[dict[str, Any]]:
        try:
            report = self.report()
        except PatchError:
            return []
        return [{**asdict(site), "replacement": site.replacement} for site in report.sites]


def _duplicated(report: megatron_spec.SpecReport) -> list[megatron_spec.Site]:
    return [site for site in report.sites if site.state == megatron_spec.NEEDS_PATCH]


def _fused(report: megatron_spec.SpecReport) -> bool:
    return any(site.state == megatron_spec.FUSED for site in report.sites)


class MegatronTree:
    """The three Megatron patches of one tree (the `megatron` package dir), or of one lone file."""

    target = "megatron"

    def __init__(self, root: Path | None, spec: MegatronSpecPatch | None, export_flag: ExportFlagPatch | None, rope: RopeGradientPatch | None) -> None:
        self.root = root
        self.spec = spec
        self.export_flag = export_flag
        self.rope = rope

    @classmethod
    def at(cls, root: Path) -> MegatronTree:
        root = Path(root)
        return cls(root, MegatronSpecPatch(root / SPEC_RELATIVE), ExportFlagPatch(root / TE_RELATIVE), RopeGradientPatch(root / MLA_RELATIVE))

    @classmethod
    def lone_file(cls, path: Path) -> MegatronTree:
        """A file outside any Megatron tree: the patch its name says (a spec for any other .py)."""
        if path.name == TE_RELATIVE.name:
            return cls(None, None, ExportFlagPatch(path), None)
        if path.name == MLA_RELATIVE.name:
            return cls(None, None, None, RopeGradientPatch(path))
        return cls(None, MegatronSpecPatch(path), None, None)

    @property
    def path(self) -> Path:
        if self.root is not None:
            return self.root
        return next(patch.path for patch in self.patches() if patch is not None)

    def patches(self) -> list[_BackedUpPatch]:
        return [patch for patch in (self.spec, self.export_flag, self.rope) if patch is not None]

    @property
    def version(self) -> str | None:
        return megatron_version(self.root / "core" if self.root is not None else self.path)

    def patch_states(self, seed_edit: bool = False, rope_fix: bool = False) -> list[PatchState]:
        """Each patch's state in this tree, for the default set or with --seed-edit / --rope-fix."""
        states: list[PatchState] = []
        shipped_duplicated = column_now = fused = None
        if self.spec is not None:
            try:
                current = self.spec.report()
                shipped = self.spec.report(self.spec.original_text()) if self.spec.has_backup() else current
            except PatchError as exc:
                states.append(PatchState(SEED_EDIT, str(self.spec.path), UNSUPPORTED, str(exc)))
            else:
                duplicated = _duplicated(current)
                shipped_duplicated = bool(_duplicated(shipped))
                fused = _fused(current)
                column_now = not duplicated or seed_edit
                backup = str(self.spec.backup_path) if self.spec.has_backup() else None
                lines = ", ".join(str(site.line) for site in duplicated)
                if not duplicated and self.spec.applied_here():
                    states.append(PatchState(SEED_EDIT, str(self.spec.path), APPLIED, "applied: the MLA down projections are column-parallel (needs the rope-gradient fix)", None, backup))
                elif not duplicated:
                    states.append(PatchState(SEED_EDIT, str(self.spec.path), NOT_NEEDED, "this release builds column-parallel MLA down projections", None, backup))
                elif seed_edit:
                    states.append(PatchState(SEED_EDIT, str(self.spec.path), NEEDED, f"requested: {len(duplicated)} duplicated down projection(s) at line(s) {lines} become column-parallel", duplicated[0].line, backup))
                else:
                    states.append(PatchState(
                        SEED_EDIT, str(self.spec.path), ON_REQUEST,
                        f"{len(duplicated)} duplicated down projection(s) at line(s) {lines}; the how-to's column-parallel "
                        "edit is applied only with --seed-edit (and then with the rope-gradient fix)",
                        duplicated[0].line, backup,
                    ))
        if self.export_flag is not None:
            states.append(self._export_flag_state(shipped_duplicated))
        if self.rope is not None:
            states.append(self._rope_state(column_now, fused, seed_edit, rope_fix))
        elif seed_edit and self.spec is not None:
            states.append(PatchState(ROPE_GRADIENT, "", UNSUPPORTED, f"{self.spec.path} is not inside a Megatron tree: the seed edit needs the rope-gradient fix in the same tree's {MLA_RELATIVE}; give the tree"))
        return states

    @staticmethod
    def _settled_state(name: str, patch, upstream: str):
        """(fields every state of this patch shares, its state when the file settles it: unsupported,
        applied or already upstream; else None, and the caller decides from the stack)."""
        found = patch.file_state()
        backup = str(patch.backup_path) if patch.has_backup() else None
        base = {"name": name, "path": str(patch.path), "line": found.line, "backup": backup}
        if found.state in (UNSUPPORTED, APPLIED):
            return found, base, PatchState(**base, state=found.state, message=found.message)
        if found.state == "present":
            return found, base, PatchState(**base, state=UPSTREAM, message=f"present upstream{upstream}: {found.message}")
        return found, base, None

    def _export_flag_state(self, shipped_duplicated: bool | None) -> PatchState:
        found, base, settled = self._settled_state(EXPORT_FLAG, self.export_flag, " (megatron-core 0.17+)")
        if settled is not None:
            return settled
        if shipped_duplicated is False:
            return PatchState(
                **base, state=NOT_NEEDED,
                message="this release's spec builds the MLA down projections column-parallel, so no duplicated TELinear is exported",
            )
        return PatchState(**base, state=NEEDED, message=f"{found.message}: flag-based exporters would send vLLM TP stacked copies of q/kv down projections")

    def _rope_state(self, column_now: bool | None, fused: bool | None, seed_edit: bool, rope_fix: bool) -> PatchState:
        found, base, settled = self._settled_state(ROPE_GRADIENT, self.rope, "")
        if settled is not None:
            return settled
        if column_now is not False or rope_fix:
            why = "requested with --rope-fix" if rope_fix and column_now is False else (
                "the seed edit makes the down projections column-parallel" if seed_edit else "the down projections are column-parallel"
            )
            if column_now is None and not rope_fix:
                why = "file given on its own"
            return PatchState(**base, state=NEEDED, message=f"{why}: {found.message}, so TP > 1 gradients differ from TP = 1")
        note = (
            "; with mla_down_proj_fusion=True the fused down projection is column-parallel: apply with --rope-fix"
            if fused
            else ""
        )
        return PatchState(**base, state=NOT_NEEDED, message=f"the down projections are duplicated, so the column-parallel branch is not taken{note}")

    def detect(self, seed_edit: bool = False, rope_fix: bool = False) -> Status:
        states = self.patch_states(seed_edit, rope_fix)
        by_state = {state.state for state in states}
        if UNSUPPORTED in by_state:
            overall = UNSUPPORTED
        elif NEEDED in by_state:
            overall = NEEDS_PATCH
        elif APPLIED in by_state:
            overall = APPLIED
        else:
            overall = NOT_NEEDED
        message = "; ".join(f"{state.name}: {state.state}" for state in states)
        if overall == UNSUPPORTED:
            message = "\n".join(state.message for state in states if state.state == UNSUPPORTED)
        return Status(
            target=self.target,
            path=str(self.path),
            state=overall,
            message=message,
            version=self.version,
            patches=[asdict(state) for state in states],
            sites=self.spec.sites() if self.spec is not None else [],
        )

    def _by_name(self) -> dict[str, _BackedUpPatch]:
        return {patch.name: patch for patch in self.patches()}

    def apply(self, dry_run: bool = False, seed_edit: bool = False, rope_fix: bool = False) -> Outcome:
        status = self.detect(seed_edit, rope_fix)
        if status.state == UNSUPPORTED:
            raise PatchError(status.message)
        wanted = [self._by_name()[state["name"]] for state in status.patches if state["state"] == NEEDED]
        if not wanted:
            return Outcome(str(self.path), False, f"nothing to do: {status.message}")
        changes = [(patch, *patch.planned_change()) for patch in wanted]
        diff = "".join(unified_diff(before, after, patch.path) for patch, before, after in changes)
        names = ", ".join(patch.name for patch in wanted)
        if dry_run:
            return Outcome(str(self.path), False, f"dry run: would apply {names}", diff)
        for patch, _, _ in changes:
            ensure_writable(patch.path)
        for patch, before, after in changes:
            patch.write(before, after)
        files = ", ".join(f"{patch.path} ({patch.name})" for patch, _, _ in changes)
        return Outcome(str(self.path), True, f"patched {files}; originals kept as <file>{BACKUP_SUFFIX}", diff)

    def revert(self, dry_run: bool = False, force: bool = False) -> Outcome:
        planned = [(patch, texts) for patch in self.patches() if (texts := patch.check_revert(force)) is not None]
        if not planned:
            return Outcome(str(self.path), False, f"nothing to revert: no {BACKUP_SUFFIX} file of a patched file under {self.path}")
        diff = "".join(unified_diff(current, original, patch.path) for patch, (current, original) in planned)
        names = ", ".join(str(patch.path) for patch, _ in planned)
        if dry_run:
            return Outcome(str(self.path), False, f"dry run: would restore {names}", diff)
        for patch, _ in planned:
            patch.restore()
        return Outcome(str(self.path), True, f"restored the original bytes of {names}", diff)


class HFConfigPatch(_BackedUpPatch):
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
            text = _read_text(self.path)
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
    from toolkit.safetensors_index import INDEX_NAME, SafetensorsError, load_index, read_header

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
    for relative in (SPEC_RELATIVE, TE_RELATIVE, MLA_RELATIVE):
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
