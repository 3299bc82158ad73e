"""Helpers for the fault tests: wait on a running command, find its workers, check nothing outlives it."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import psutil


def wait_until(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    """Poll `condition` while `process` runs; fail if it ends first or the time runs out."""
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, f"exited {process.returncode} too early: {process.stderr.read() if process.stderr else ''}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def spawned_workers(pid: int) -> list[psutil.Process]:
    """The multiprocessing workers a process started (not its resource tracker)."""
    return [child for child in psutil.Process(pid).children() if "spawn_main" in " ".join(child.cmdline())]


def assert_gone(pids: list[int], timeout: float = 10) -> None:
    def alive() -> list[int]:
        found = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    found.append(pid)
            except psutil.NoSuchProcess:
                pass
        return found

    deadline = time.time() + timeout
    while alive() and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(), f"processes left behind: {alive()}"


def fill(mount_point: Path) -> Path:
    """Write a ballast file until the filesystem is full; returns it (delete it to free the space)."""
    ballast = mount_point / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for size in (1 << 20, 4096, 1):  # big pieces, then the last crumbs
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return ballast
