"""Two `launch grpo` processes (rank 0 and rank 1) forming a Ray cluster on 127.0.0.1, run by
test_launch_cluster inside `unshare -n`: a network namespace whose only interface is loopback.

Usage: python tests/netns_cluster.py OUT.json RUN_DIR -- LAUNCH_GRPO_ARGS...
Writes each rank's exit code and output, the namespace's interfaces and every address a socket
listened on while the cluster lived.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil


def interfaces() -> list[str]:
    lines = Path("/proc/net/dev").read_text().splitlines()[2:]  # this process's namespace
    return sorted(line.split(":", 1)[0].strip() for line in lines)


def main(argv: list[str]) -> int:
    out, run_dir, args = Path(argv[0]), Path(argv[1]), argv[argv.index("--") + 1:]
    if shutil.which("ip"):
        subprocess.run(["ip", "link", "set", "lo", "up"], check=False)
    listening: set[str] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                listening.update(c.laddr.ip for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN)
            except psutil.Error:
                pass
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    launch = [sys.executable, "-m", "launch.cli", "grpo", *args]
    worker = subprocess.Popen([*launch, "--node-rank", "1", "--run-dir", str(run_dir / "rank1")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    head = subprocess.run([*launch, "--node-rank", "0", "--run-dir", str(run_dir / "rank0")], capture_output=True, text=True)
    try:
        worker_out, _ = worker.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker_out, _ = worker.communicate()
    done.set()
    watcher.join()
    out.write_text(json.dumps({
        "interfaces": interfaces(),
        "listening": sorted(listening),
        "head": {"code": head.returncode, "stdout": head.stdout, "stderr": head.stderr},
        "worker": {"code": worker.returncode, "stdout": worker_out},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
