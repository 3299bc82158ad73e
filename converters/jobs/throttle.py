"""A write-rate limit (`--max-write-mbps`): be gentle with a shared filesystem."""

from __future__ import annotations

import time


class Throttle:
    """Sleep after writes so that the average rate since the start stays under `bytes_per_s` (None: no limit)."""

    def __init__(self, bytes_per_s: float | None) -> None:
        self.bytes_per_s = bytes_per_s
        self.start = time.perf_counter()
        self.written = 0

    def wrote(self, count: int) -> None:
        if self.bytes_per_s:
            self.written += count
            ahead = self.written / self.bytes_per_s - (time.perf_counter() - self.start)
            if ahead > 0:
                time.sleep(ahead)
