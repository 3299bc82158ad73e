"""The Megatron patches as objects: four source codemods grouped per tree, and which of them a release needs.

Megatron (one file each, all libcst codemods, each kept once as `<file>.orig` for an exact revert):
  export-flag    extensions/transformer_engine.py   duplicated TELinear weights marked not TP-split
  rope-gradient  transformer/multi_latent_attention.py  k_pos_emb gradient summed over TP ranks
  seed-edit      models/gpt/gpt_layer_specs.py       the how-to's column-parallel down projections
  q-proj-norm    transformer/mla_qk_norm_config.py   0.19+: no q norm fused into linear_q_proj without a query LoRA
Which of them a tree needs follows from its release and layout (`MegatronTree.patch_states`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from patcher import megatron_spec, mla_q_proj_norm, mla_rope_grad, te_export_flag
from patcher.backup import BACKUP_SUFFIX, BackedUpPatch, ensure_writable, read_text, unified_diff
from patcher.cst_util import SourceParseError
from patcher.states import (
    APPLIED,
    EXPORT_FLAG,
    NEEDED,
    NEEDS_PATCH,
    NOT_NEEDED,
    ON_REQUEST,
    Q_PROJ_NORM,
    ROPE_GRADIENT,
    SEED_EDIT,
    UNSUPPORTED,
    UPSTREAM,
    Outcome,
    PatchError,
    PatchState,
    Status,
)
from patcher.versions import megatron_version

SPEC_RELATIVE = Path("core/models/gpt/gpt_layer_specs.py")
TE_RELATIVE = Path("core/extensions/transformer_engine.py")
MLA_RELATIVE = Path("core/transformer/multi_latent_attention.py")
QK_NORM_RELATIVE = Path("core/transformer/mla_qk_norm_config.py")  # megatron-core 0.19+


@dataclass(frozen=True)
class FileState:
    """A codemod's reading of one file: needs-patch, applied (by us), present (upstream) or unsupported."""

    state: str
    message: str
    line: int | None = None


class CodemodPatch(BackedUpPatch):
    """A libcst codemod (a module with `scan` and `rewrite`) on one Megatron source file."""

    codemod: ModuleType
    relative: Path

    def transform(self, text: str) -> str:
        return self.codemod.rewrite(text)

    def file_state(self) -> FileState:
        if not self.path.is_file():
            return FileState(UNSUPPORTED, f"{self.path}: missing; is this a complete Megatron tree?")
        try:
            report = self.codemod.scan(read_text(self.path))
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


class QProjNormPatch(CodemodPatch):
    """megatron-core 0.19's resolver: a plain `linear_q_proj` (no fused q norm) when q_lora_rank is null.

    Part of `MegatronTree` (`patcher status/apply/revert` apply and revert it with the others).
    Releases without core/transformer/mla_qk_norm_config.py (<= 0.18) build `linear_q_proj` from the
    spec and do not need it. Models with a query LoRA take the other branch: harmless to them.
    """

    name = Q_PROJ_NORM
    codemod = mla_q_proj_norm
    relative = QK_NORM_RELATIVE


class MegatronSpecPatch(BackedUpPatch):
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
            report = megatron_spec.scan(read_text(self.path) if text is None else text)
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
    """The four Megatron patches of one tree (the `megatron` package dir), or of one lone file."""

    target = "megatron"

    def __init__(self, root: Path | None = None, spec: MegatronSpecPatch | None = None, export_flag: ExportFlagPatch | None = None,
                 rope: RopeGradientPatch | None = None, q_proj_norm: QProjNormPatch | None = None) -> None:
        self.root = root
        self.spec = spec
        self.export_flag = export_flag
        self.rope = rope
        self.q_proj_norm = q_proj_norm

    @classmethod
    def at(cls, root: Path) -> MegatronTree:
        root = Path(root)
        return cls(root, MegatronSpecPatch(root / SPEC_RELATIVE), ExportFlagPatch(root / TE_RELATIVE), RopeGradientPatch(root / MLA_RELATIVE),
                   QProjNormPatch(root / QK_NORM_RELATIVE))

    @classmethod
    def lone_file(cls, path: Path) -> MegatronTree:
        """A file outside any Megatron tree: the patch its name says (a spec for any other .py)."""
        if path.name == TE_RELATIVE.name:
            return cls(export_flag=ExportFlagPatch(path))
        if path.name == MLA_RELATIVE.name:
            return cls(rope=RopeGradientPatch(path))
        if path.name == QK_NORM_RELATIVE.name:
            return cls(q_proj_norm=QProjNormPatch(path))
        return cls(spec=MegatronSpecPatch(path))

    @property
    def path(self) -> Path:
        if self.root is not None:
            return self.root
        return next(patch.path for patch in self.patches() if patch is not None)

    def patches(self) -> list[BackedUpPatch]:
        return [patch for patch in (self.spec, self.export_flag, self.rope, self.q_proj_norm) if patch is not None]

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
        if self.q_proj_norm is not None:
            states.append(self._q_proj_norm_state())
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

    def _q_proj_norm_state(self) -> PatchState:
        """needed / applied / not-needed (no resolver: <= 0.18) / upstream / unsupported."""
        patch = self.q_proj_norm
        if not patch.path.is_file() and not patch.has_backup():
            return PatchState(Q_PROJ_NORM, str(patch.path), NOT_NEEDED,
                              "this release has no mla_qk_norm_config.py: linear_q_proj is built from the spec (no fused q norm)")
        found, base, settled = self._settled_state(Q_PROJ_NORM, patch, "")
        if settled is not None:
            return settled
        return PatchState(**base, state=NEEDED, message=f"{found.message}: q_lora_rank-null models (DeepSeek-V2-Lite, Moonlight) "
                          "get an RMSNorm before q_proj that HF does not have")

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

    def _by_name(self) -> dict[str, BackedUpPatch]:
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
