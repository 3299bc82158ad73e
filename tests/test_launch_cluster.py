"""launch grpo on a real Ray cluster on 127.0.0.1: verl's hydra app in config-print mode, timeouts, cleanup."""

from __future__ import annotations

import ipaddress
import shutil
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

RAY_DAEMONS = ("gcs_server", "raylet")


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
    from converters.fixtures import make_fp8_checkpoint, math_sample_rows

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
        "--data", str(inputs["data"]), "--ray-port", str(port), "--head", "127.0.0.1", *extra,
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
