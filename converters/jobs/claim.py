"""Who writes a destination: the conversion recorded in it, its number of parts, and a lock per part.

`check` only reads, so a refused run leaves the destination as it found it; `claim` creates the
state dir, takes this part's lock (a second identical run is refused and told who holds it), and
records the conversion. Other `--shard` parts of the same conversion take other locks and run
alongside; a part with another N is refused, since the parts would not cover the work between them.
Unfinished files live in the state dir under names that carry host and pid (`temp_path`), so a
re-run removes those of dead processes of its own host and never another machine's work.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atomicio import atomic_write_bytes
from toolkit.errors import ConvertError

CLAIM_FILE = "claim.json"


@dataclass(frozen=True)
class Destination:
    """`root` is --dst; `state_dir` (inside it) holds the claim, the locks and unfinished files."""

    root: Path
    state_dir: Path
    identity: dict[str, Any]  # what must match for a re-run to resume: tool, source, options
    part: int = 0
    parts: int = 1
    overwrite: bool = False

    def recorded(self) -> dict[str, Any] | None:
        try:
            claim = json.loads((self.state_dir / CLAIM_FILE).read_text())
        except (OSError, ValueError):
            return None
        return claim if isinstance(claim, dict) else None

    def check(self) -> None:
        """Refuse a destination that holds something else; reads only."""
        if self.root.exists() and not self.root.is_dir():
            raise ConvertError(f"--dst {self.root} exists and is not a directory")
        recorded = self.recorded()
        if recorded is None:
            foreign = self._foreign_entries()
            if foreign and not self.overwrite:
                shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
                raise ConvertError(
                    f"--dst {self.root} is not empty ({shown}) and holds no interrupted conversion of this source "
                    "with these options; choose an empty directory or pass --overwrite"
                )
            return
        if self.overwrite:
            return
        if recorded.get("identity") != self.identity:
            raise ConvertError(
                f"--dst {self.root} holds an unfinished conversion of another source or with other options "
                f"({_differences(recorded.get('identity'), self.identity)}); use a new directory, or pass --overwrite"
            )
        if recorded.get("parts") != self.parts:
            raise ConvertError(
                f"--dst {self.root} is being converted in {recorded.get('parts')} parts (--shard I/{recorded.get('parts')}) "
                f"but this run says --shard {self.part}/{self.parts}: every part must give the same N. To split an "
                "unfinished conversion differently, stop every part and re-run with --overwrite (finished files are kept)"
            )

    def starts_over(self) -> bool:
        """--overwrite over another conversion (or none on record): nothing already there may be reused.

        Outputs of another source can have the very same names, sizes and headers (DeepSeek-V3 and R1
        share every shape), so a converter that starts over rewrites every item instead of resuming.
        """
        if not self.overwrite:
            return False
        recorded = self.recorded()
        return recorded is None or recorded.get("identity") != self.identity

    def _foreign_entries(self) -> list[str]:
        """Entries of `root` other than the state dir and the dirs leading to it."""
        if not self.root.is_dir():
            return []
        on_the_way = set(self.state_dir.parents)
        found, directories = [], [self.root]
        for directory in directories:
            for entry in sorted(directory.iterdir()):
                if entry == self.state_dir:
                    continue
                if entry in on_the_way and entry.is_dir():
                    directories.append(entry)
                else:
                    found.append(str(entry.relative_to(self.root)))
        return found

    @contextmanager
    def claim(self) -> Iterator[None]:
        """Hold this part's lock while inside; the conversion is recorded once the lock is held."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        lock_path = self.state_dir / f"part-{self.part}-of-{self.parts}.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConvertError(f"--dst {self.root}: part {self.part}/{self.parts} {_holder(fd)}") from None
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)
            self.check()  # again under the lock: another part may have claimed meanwhile
            claim = {"identity": self.identity, "parts": self.parts}
            if self.recorded() != claim:
                atomic_write_bytes(self.state_dir / CLAIM_FILE, json.dumps(claim, indent=1, sort_keys=True).encode())
            yield
        finally:
            os.close(fd)  # releases the lock; the file stays, so no one ever locks a file that was replaced


def _holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        return (f"is already being written by pid {holder['pid']} on host {holder['host']} (since {holder['since']}); "
                f"wait for it to finish, or stop it and re-run to resume")
    except (OSError, ValueError, KeyError, TypeError):
        return "is already being written by another process; wait for it to finish, or stop it and re-run to resume"


def _differences(recorded: object, wanted: dict[str, Any]) -> str:
    if not isinstance(recorded, dict):
        return "no readable record"
    keys = sorted(key for key in recorded.keys() | wanted.keys() if recorded.get(key) != wanted.get(key))
    shown = [f"{key}: {recorded.get(key)!r} there, {wanted.get(key)!r} now" for key in keys if key != "shards"]
    if "shards" in keys:
        shown.append("the source files differ (size or modification time)")
    return "; ".join(shown)


def temp_path(state_dir: Path, name: str) -> Path:
    """Where output `name` is written before it is renamed into place: host and pid in the name."""
    return state_dir / f"{name}~{socket.gethostname()}~{os.getpid()}.tmp"


def remove_dead_temps(state_dir: Path) -> None:
    """Remove the temp files of this host's processes that are gone; anything else is left alone."""
    for stale in state_dir.glob("*.tmp"):
        if _temp_owner_dead(stale):
            stale.unlink(missing_ok=True)


def _temp_owner_dead(path: Path) -> bool:
    try:
        _, host, pid = path.name[: -len(".tmp")].split("~")
        owner = int(pid)
    except ValueError:
        return False  # not a name we give temp files
    if host != socket.gethostname():
        return False  # another machine's part: its pid means nothing here
    try:
        os.kill(owner, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, someone else's
    return False
