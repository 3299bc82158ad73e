"""The Ray cluster of a GRPO run: the head on node 0, workers elsewhere, only our own processes stopped.

Each node runs `ray start --block` as our child, so stopping it stops exactly the Ray processes we
started (never `ray stop`, which would end other users' Ray on a shared node). Every node advertises
a `dsv3_node_<rank>` resource, so the head can name the ranks that never joined.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

RAY_PORT = 6379
# Ray's local-only mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) keeps every socket on loopback but takes
# no workers. Ray 2.60's cluster mode takes workers but listens on every interface and advertises the
# machine's address, so a multi-node cluster on 127.0.0.1 (tests) belongs in a network namespace whose
# only interface is loopback.
LOCAL_ONLY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def is_loopback(host: str) -> bool:
    return host.startswith("127.") or host == "localhost"


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
    dashboard_port: int = 8265

    @property
    def address(self) -> str:
        return f"{self.head}:{self.port}"

    @property
    def local_only(self) -> bool:
        """A one-node cluster on loopback: Ray's local-only mode, nothing listens beyond 127.0.0.1."""
        return self.nodes == 1 and is_loopback(self.head)

    def ray_env(self) -> dict[str, str]:
        return {"RAY_USAGE_STATS_ENABLED": "0", **(LOCAL_ONLY_ENV if self.local_only else {})}


# what Ray's dashboard (and with it the job API behind --ray-address) imports; a minimal Ray lacks them
DASHBOARD_MODULES = ("aiohttp", "aiohttp_cors", "grpc", "opencensus", "opentelemetry", "prometheus_client")


def dashboard_missing() -> list[str]:
    """The dashboard's modules this Python cannot import (empty: `ray start --include-dashboard=true` works)."""
    from launch.overrides import importable

    return [module for module in DASHBOARD_MODULES if not importable(module)]


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
        args += ["--head", f"--port={spec.port}", f"--node-ip-address={spec.head}"]
        # a minimal Ray (ray without its [default] extra) refuses to start when asked for a dashboard;
        # the trainer does not need it, only `--ray-address` job submission and the web view do
        args += [f"--dashboard-host={spec.dashboard_host}", f"--dashboard-port={spec.dashboard_port}", "--include-dashboard=true"] \
            if not dashboard_missing() else ["--include-dashboard=false"]
    else:
        args += [f"--address={spec.address}"]
        if is_loopback(spec.head):
            args.append("--node-ip-address=127.0.0.1")
    env = {**os.environ, **spec.ray_env(), **environment}
    handle = open(log, "ab")  # noqa: SIM115 - the child writes to it for its whole life
    return subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop_node(process: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a child we started in its own process group (`ray start --block`, the trainer) and everything in it."""
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


def registered(spec: NodeSpec) -> dict[int, float]:
    """rank -> GPUs of every alive node of the cluster at `spec.address` (asked in a fresh process)."""
    probe = (
        f"import json, ray; ray.init(address={spec.address!r}, logging_level='ERROR');"
        "print(json.dumps([n['Resources'] for n in ray.nodes() if n['Alive']])); ray.shutdown()"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env={**os.environ, **spec.ray_env()}, timeout=120)
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
        seen = registered(spec)
        if len(seen) == spec.nodes and all(gpus >= spec.gpus for gpus in seen.values()):
            return seen
        time.sleep(poll)
    missing = sorted(set(range(spec.nodes)) - set(seen))
    short = sorted(rank for rank, gpus in seen.items() if gpus < spec.gpus)
    raise ClusterError(
        f"after {timeout:.0f} s, {len(seen)} of {spec.nodes} nodes joined the Ray head at {spec.address}; "
        + (f"missing node rank(s): {', '.join(map(str, missing))}" if missing else "")
        + (f"; rank(s) {short} registered fewer than {spec.gpus} GPUs" if short else "")
    )


def run_tee(command: list[str], log: Path, environment: dict[str, str]) -> int:
    """Run `command` with `environment` added, copying its output to our stdout and to `log`; return its exit code.

    The command runs in its own process group; if we are interrupted (Ctrl-C, SIGTERM turned into
    KeyboardInterrupt) it is stopped with its group before the exception goes on: the trainer never
    outlives the launcher."""
    with open(log, "ab") as sink:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **environment},
                                   start_new_session=True)
        try:
            for line in process.stdout:
                sys.stdout.buffer.write(line)
                sys.stdout.buffer.flush()
                sink.write(line)
                sink.flush()  # `tail -f train.log` and `launch report` see each line as it comes
            return process.wait()
        except BaseException:
            stop_node(process)
            raise
        finally:
            process.stdout.close()


def run_on_cluster(command: list[str], log: Path, environment: dict[str, str], spec: NodeSpec) -> int:
    """The trainer on the cluster this command formed (RAY_ADDRESS points verl at it)."""
    return run_tee(command, log, {**spec.ray_env(), **environment, "RAY_ADDRESS": spec.address})


def submit_job(address: str, command: list[str], log: Path, environment: dict[str, str]) -> int:
    """`ray job submit` to an existing cluster and wait; the entrypoint's own exit code when Ray reports it."""
    args = [ray_executable(), "job", "submit", f"--address={address}",
            f"--runtime-env-json={json.dumps({'env_vars': environment})}", "--", *command]
    start = log.stat().st_size if log.exists() else 0  # a reused run dir's log holds earlier runs
    code = run_tee(args, log, {"RAY_USAGE_STATS_ENABLED": "0"})
    if code != 0:  # `ray job submit` says 1 for any failure; the job's status message has the real code
        with open(log, "rb") as handle:
            handle.seek(start)
            found = re.findall(rb"failed with exit code (\d+)", handle.read())
        if found:
            return int(found[-1])
    return code


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
