"""One progress reporter: a tqdm bar on a terminal, a plain line every ~30 s or 5% in a log file.

A log file never gets carriage returns: one line per report, readable with `tail -f` and `grep`.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

LINE_SECONDS = 30.0
LINE_FRACTION = 0.05


class Progress:
    """`start(total)` gives the callable a converter reports bytes to; `close()` ends the display.

    `start` has the shape of the converters' `progress_factory` argument.
    """

    def __init__(self, desc: str, quiet: bool = False, stream: TextIO | None = None,
                 line_seconds: float = LINE_SECONDS, line_fraction: float = LINE_FRACTION) -> None:
        self.desc = desc
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.line_seconds = line_seconds
        self.line_fraction = line_fraction
        self.total = 0
        self.done = 0
        self._bar = None
        self._started = 0.0
        self._last_time = 0.0
        self._last_done = 0

    def start(self, total: int):
        self.total, self.done = total, 0
        self._started = self._last_time = time.monotonic()
        if self.quiet:
            return self._ignore
        if self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total or None, unit="B", unit_scale=True, unit_divisor=1000, desc=self.desc, file=self.stream)
            return self._bar.update
        return self._line

    def _ignore(self, count: int) -> None:
        pass

    def _line(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        step = self.total * self.line_fraction
        if now - self._last_time >= self.line_seconds or (step and self.done - self._last_done >= step):
            self._write(now)

    def _write(self, now: float) -> None:
        elapsed = max(now - self._started, 1e-9)
        rate = self.done / elapsed
        percent = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        eta = f", {(self.total - self.done) / rate:.0f} s left" if rate and self.total > self.done else ""
        print(f"{self.desc}: {self.done / 1e9:.2f} of {self.total / 1e9:.2f} GB{percent}, "
              f"{rate / 1e6:.0f} MB/s, {elapsed:.0f} s{eta}", file=self.stream, flush=True)
        self._last_time, self._last_done = now, self.done

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif not self.quiet and self._started and self.done != self._last_done:
            self._write(time.monotonic())
