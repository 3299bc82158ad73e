"""The options every long conversion takes: device, worker processes, which --shard part, --overwrite."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converters.jobs.claim import Destination


@dataclass(frozen=True)
class JobOptions:
    device: str = "cpu"
    workers: int = 1
    shard_index: int = 0
    shard_count: int = 1
    overwrite: bool = False
    max_write_bytes_per_s: float | None = None  # be gentle with a shared filesystem (split over the workers)

    @property
    def write_limit(self) -> float | None:
        """Bytes/s each writing process may write: --max-write-mbps shared by the --workers processes."""
        return self.max_write_bytes_per_s / self.workers if self.max_write_bytes_per_s else None

    def destination(self, root: Path, state_dir: Path, identity: dict[str, Any]) -> Destination:
        """This part's claim on `root`, with the conversion's state kept in `state_dir`."""
        return Destination(root, state_dir, identity, self.shard_index, self.shard_count, self.overwrite)
