"""launch grpo on real Ray clusters on 127.0.0.1 (one node; two nodes in a network namespace): verl's hydra app,
exit codes, timeouts, loopback-only sockets, cleanup."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

pytest.importorskip("verl")
pytest.importorskip("ray")
pytestmark = pytest.mark.slow

RAY_DAEMONS = ("gcs_server", "raylet", "dashboard.py")


def ray_daemons() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        if any(daemon in (process.info["name"] or "") or f"/{daemon} " in command for daemon in RAY_DAEMONS):
            found.append(process)
    return found


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or address).is_loopback


def wait_no_ray(timeout: float = 60) -> list[psutil.Process]:
    deadline = time.time() + timeout
    while time.time() < deadline and ray_daemons():
        time.sleep(1)
    return ray_daemons()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    from converters.testing import make_fp8_checkpoint, math_sample_rows

    root = tmp_path_factory.mktemp("cluster")
    fp8, model, ckpt, raw, data = (root / n for n in ("fp8", "model", "mcore", "raw", "data"))
    make_fp8_checkpoint(fp8, shards=2)
    cli = [sys.executable, "-m", "converters.cli"]
    subprocess.run([*cli, "fp8-bf16", "--src", str(fp8), "--dst", str(model), "--drop-mtp", "--quiet"], check=True)
    subprocess.run([*cli, "hf-mcore", "--src", str(model), "--dst", str(ckpt), "--quiet"], check=True)
    raw.mkdir()
    import json

    for split, rows in math_sample_rows().items():
        (raw / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    subprocess.run([*cli, "math-lighteval", "--src", str(raw), "--dst", str(data)], check=True, capture_output=True)
    assert not ray_daemons(), "a Ray cluster is already running on this machine"
    return {"model": model, "ckpt": ckpt, "data": data, "root": root}


def launch(inputs, *extra: str, port: int) -> list[str]:
    return [
        sys.executable, "-m", "launch.cli", "grpo", "--model", str(inputs["model"]), "--mcore-ckpt", str(inputs["ckpt"]),
        "--data", str(inputs["data"]), "--ray-port", str(port), "--dashboard-port", str(port + 2000), "--head", "127.0.0.1", *extra,
    ]


def test_single_node_runs_verls_hydra_app_loopback_only(inputs, tmp_path):
    run_dir = tmp_path / "run"
    listening: set[str] = set()
    done = threading.Event()

    def watch() -> None:  # every socket Ray's daemons listen on, while the run lasts
        while not done.is_set():
            for process in ray_daemons():
                try:
                    for connection in process.net_connections(kind="inet"):
                        if connection.status == psutil.CONN_LISTEN:
                            listening.add(connection.laddr.ip)
                except psutil.Error:
                    pass
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    command = launch(inputs, "--nodes", "1", "--gpus-per-node", "2", "--run-dir", str(run_dir), "--print-config", port=6481)
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    done.set()
    watcher.join()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "all 1 nodes joined with 2 GPUs" in result.stdout
    assert listening and all(_loopback(ip) for ip in listening), listening
    text = (run_dir / "train.log").read_text()
    body = "\n".join(line for line in text.splitlines() if not line.startswith(("WARNING", "INFO", "[")))
    config = yaml.safe_load(body)
    megatron = config["actor_rollout_ref"]["actor"]["megatron"]
    assert megatron["dist_checkpointing_path"] == str((inputs["ckpt"] / "release").resolve())
    assert megatron["use_dist_checkpointing"] is True
    assert config["trainer"]["nnodes"] == 1 and config["trainer"]["n_gpus_per_node"] == 2
    assert config["algorithm"]["adv_estimator"] == "grpo"
    assert (run_dir / "command.json").is_file()
    assert not wait_no_ray(), "Ray processes were left running"


def test_a_node_that_never_joins_is_named(inputs, tmp_path):
    command = launch(inputs, "--nodes", "2", "--gpus-per-node", "1", "--join-timeout", "15", "--run-dir", str(tmp_path / "run"), port=6482)
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "1 of 2 nodes joined" in result.stderr and "missing node rank(s): 1" in result.stderr
    assert not wait_no_ray(), "Ray processes were left running"
    shutil.rmtree(tmp_path / "run", ignore_errors=True)


def network_namespaces() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def two_nodes(inputs, tmp_path: Path, *extra: str, port: int) -> dict:
    """Rank 0 and rank 1 as two `launch grpo` processes, in a namespace where lo is the only interface."""
    if not network_namespaces():
        pytest.skip("a two-node Ray cluster on 127.0.0.1 needs a network namespace (`unshare -n`, root)")
    out = tmp_path / "two-nodes.json"
    args = launch(inputs, "--nodes", "2", "--gpus-per-node", "1", "--join-timeout", "120", *extra, port=port)[4:]
    runner = Path(__file__).parents[1] / "netns_cluster.py"
    subprocess.run(["unshare", "-n", sys.executable, str(runner), str(out), str(tmp_path / "run"), "--", *args],
                   check=True, timeout=600, cwd=Path(__file__).parents[2])
    result = json.loads(out.read_text())
    assert result["interfaces"] == ["lo"], result["interfaces"]
    # Ray's cluster mode listens on the wildcard address too; in this namespace that is loopback alone.
    assert result["listening"] and all(ip in ("0.0.0.0", "::") or _loopback(ip) for ip in result["listening"]), result["listening"]
    assert "joined the Ray head at 127.0.0.1" in result["worker"]["stdout"] and "the head went away" in result["worker"]["stdout"]
    assert result["worker"]["code"] == 0, result["worker"]["stdout"][-3000:]
    assert not wait_no_ray(), "Ray processes were left running"
    return result


def test_two_nodes_join_and_verl_composes_the_planned_config(inputs, tmp_path):
    result = two_nodes(inputs, tmp_path, "--print-config", port=6483)
    head = result["head"]
    assert head["code"] == 0, head["stderr"][-3000:]
    assert "all 2 nodes joined with 2 GPUs" in head["stdout"]
    text = (tmp_path / "run" / "rank0" / "train.log").read_text()
    config = yaml.safe_load("\n".join(line for line in text.splitlines() if not line.startswith(("WARNING", "INFO", "["))))
    assert config["trainer"]["nnodes"] == 2 and config["trainer"]["n_gpus_per_node"] == 1
    megatron = config["actor_rollout_ref"]["actor"]["megatron"]
    planned = json.loads((tmp_path / "run" / "rank0" / "command.json").read_text())
    assert f"actor_rollout_ref.actor.megatron.expert_model_parallel_size={megatron['expert_model_parallel_size']}" in planned
    assert megatron["dist_checkpointing_path"] == str((inputs["ckpt"] / "release").resolve())


def test_two_nodes_verls_exit_code_propagates(inputs, tmp_path):
    """Without --print-config verl's real trainer starts, and on a machine without GPUs it fails."""
    result = two_nodes(inputs, tmp_path, port=6484)
    head = result["head"]
    assert "all 2 nodes joined with 2 GPUs" in head["stdout"]
    printed = [line for line in head["stdout"].splitlines() if line.startswith("verl exited with code ")]
    assert printed, head["stdout"][-3000:]
    code = int(printed[-1].rsplit(" ", 1)[1])
    assert code != 0 and head["code"] == code
    assert "Traceback" in (tmp_path / "run" / "rank0" / "train.log").read_text()
    assert (tmp_path / "run" / "rank0" / "hydra").is_dir()  # hydra's output dir is the run's, not the current dir


def test_ray_address_submits_to_an_existing_cluster(inputs, tmp_path):
    """--ray-address: `ray job submit` to a cluster someone else started (here: a loopback-only head)."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    ray = str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen([ray, "start", "--head", "--block", "--port=6485", "--node-ip-address=127.0.0.1", "--num-gpus=2",
                             "--dashboard-host=127.0.0.1", "--dashboard-port=8485"], env=env, start_new_session=True, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and subprocess.run(["curl", "-sf", "http://127.0.0.1:8485/api/version"], capture_output=True).returncode:
            time.sleep(1)
        common = launch(inputs, "--nodes", "1", "--gpus-per-node", "2", "--ray-address", "http://127.0.0.1:8485", "--python", sys.executable, port=6485)
        run_dir = tmp_path / "run"
        result = subprocess.run([*common, "--print-config", "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        assert "verl exited with code 0" in result.stdout
        config = yaml.safe_load("\n".join(line for line in (run_dir / "train.log").read_text().splitlines()
                                           if line.startswith((" ", "actor_rollout_ref:", "trainer:", "algorithm:"))))
        assert config["trainer"]["n_gpus_per_node"] == 2
        # The real trainer fails without GPUs: the job's own exit code comes back, not just Ray's 1.
        failed = subprocess.run([*common, "--run-dir", str(tmp_path / "fail")], capture_output=True, text=True, timeout=300)
        printed = [line for line in failed.stdout.splitlines() if line.startswith("verl exited with code ")]
        assert printed and failed.returncode == int(printed[-1].rsplit(" ", 1)[1]) != 0, failed.stdout[-3000:]
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
    assert not wait_no_ray(), "Ray processes were left running"
