"""The words `patcher` reports in, the records it reports with, and its one error.

Overall states are also the exit codes of `patcher status`; a Megatron patch's own state in its tree
(needed, upstream, on request, ...) rolls up into one of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

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

EXPORT_FLAG = "export-flag"
ROPE_GRADIENT = "rope-gradient"
SEED_EDIT = "seed-edit"
Q_PROJ_NORM = "q-proj-norm"


class PatchError(Exception):
    """An expected failure: bad target, unsupported file, refused revert. Exit code 2."""


class ReadOnlyTargetError(PatchError):
    """The file to patch has no write bit; the message says what to do."""


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
