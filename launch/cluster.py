"""The Ray cluster of a GRPO run: the head on node 0, workers elsewhere, only our own processes stopped.

Each node runs `ray start --block` as our child, so stopping it stops exactly the Ray processes we
started (never `ray stop`, which would end other users' Ray on a shared node). Every node advertises
a `dsv3_node_<rank>` resource, so the head can name the ranks that never joined.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

RAY_PORT = 6379
# With a 127.x head, Ray's local-only mode: every socket on loopback. (In cluster mode Ray 2.60 binds
# all interfaces and advertises the machine's address even when told 127.0.0.1; that mode also
# refuses workers, so a loopback head is a single-node cluster.)
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def ray_env(head: str) -> dict[str, str]:
    return LOOPBACK_ENV if head.startswith("127.") or head == "localhost" else {"RAY_USAGE_STATS_ENABLED": "0"}


class ClusterError(RuntimeError):
    """The cluster could not be formed; the message names the missing ranks or the failing command."""


@dataclass
class NodeSpec:
    rank: int
    nodes: int
    gpus: int
    head: str
    port: int = RAY_PORT
    dashboard_host: str = "127.0.0.1"


def ray_executable() -> str:
    found = shutil.which("ray", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    if not found:
        raise ClusterError("the `ray` command is not installed in this environment: pip install 'ray[default]'")
    return found


def start_node(spec: NodeSpec, environment: dict[str, str], log: Path) -> subprocess.Popen:
    """`ray start --block` for this node (head on rank 0), as our child in its own process group."""
    args = [ray_executable(), "start", "--block", f"--num-gpus={spec.gpus}", "--disable-usage-stats",
            f"--resources={json.dumps({f'dsv3_node_{spec.rank}': 1})}"]
    if spec.rank == 0:
        args += ["--head", f"--port={spec.port}", f"--node-ip-address={spec.head}", f"--dashboard-host={spec.dashboard_host}", "--include-dashboard=false"]
    else:
        args += [f"--address={spec.head}:{spec.port}"]
        if spec.head.startswith("127."):
            args.append("--node-ip-address=127.0.0.1")
    env = {**os.environ, **ray_env(spec.head), **environment}
    handle = open(log, "ab")  # noqa: SIM115 - the child writes to it for its whole life
    return subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop_node(process: subprocess.Popen, timeout: float = 30) -> None:
    """Stop our `ray start --block` and everything it started (its process group)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()


def registered(address: str) -> dict[int, float]:
    """rank -> GPUs of every alive node of the cluster at `address` (asked in a fresh process)."""
    probe = (
        f"import json, ray; ray.init(address={address!r}, logging_level='ERROR');"
        "print(json.dumps([n['Resources'] for n in ray.nodes() if n['Alive']])); ray.shutdown()"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env={**os.environ, **ray_env(address)}, timeout=120)
    lines = [line for line in result.stdout.splitlines() if line.startswith("[")]
    if not lines:
        return {}
    ranks = {}
    for resources in json.loads(lines[-1]):
        for key, _ in resources.items():
            if key.startswith("dsv3_node_"):
                ranks[int(key.rsplit("_", 1)[1])] = resources.get("GPU", 0.0)
    return ranks


def wait_for_nodes(spec: NodeSpec, timeout: float, poll: float = 2.0) -> dict[int, float]:
    """Block until every rank has joined with its GPUs; on timeout name the missing ranks."""
    deadline = time.monotonic() + timeout
    seen: dict[int, float] = {}
    while time.monotonic() < deadline:
        seen = registered(f"{spec.head}:{spec.port}")
        if len(seen) == spec.nodes and all(gpus >= spec.gpus for gpus in seen.values()):
            return seen
        time.sleep(poll)
    missing = sorted(set(range(spec.nodes)) - set(seen))
    short = sorted(rank for rank, gpus in seen.items() if gpus < spec.gpus)
    raise ClusterError(
        f"after {timeout:.0f} s, {len(seen)} of {spec.nodes} nodes joined the Ray head at {spec.head}:{spec.port}; "
        + (f"missing node rank(s): {', '.join(map(str, missing))}" if missing else "")
        + (f"; rank(s) {short} registered fewer than {spec.gpus} GPUs" if short else "")
    )


def run_tee(command: list[str], log: Path, environment: dict[str, str], head: str) -> int:
    """Run the trainer, copying its output to our stdout and to `log`; return its exit code."""
    env = {**os.environ, **ray_env(head), **environment}
    with open(log, "ab") as sink, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) as process:
        for line in process.stdout:
            sys.stdout.buffer.write(line)
            sys.stdout.buffer.flush()
            sink.write(line)
        return process.wait()


def stop_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt, so `finally` blocks stop our Ray processes."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def wait_until_head_leaves(process: subprocess.Popen) -> int:
    """A worker's life: until its `ray start --block` ends (the head went away) or we are told to stop."""
    try:
        return process.wait()
    except KeyboardInterrupt:
        return 130
