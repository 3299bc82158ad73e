"""The job engine: partitioning, the worker pool with real processes and signals, the claim and its lock, progress."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from faults import assert_gone

from converters.jobs.claim import CLAIM_FILE, Destination, remove_dead_temps, temp_path
from converters.jobs.errors import Interrupted, WorkerDied, as_convert_error
from converters.jobs.partition import balance
from converters.jobs.pool import run_workers
from converters.jobs.progress import Progress
from toolkit.errors import ConvertError

REPO = Path(__file__).resolve().parents[2]
TEST_PATHS = [str(Path(__file__).resolve().parent), str(REPO / "tests")]  # test_jobs, then faults


def test_balance_gives_largest_first_to_the_least_loaded_part():
    # 9 -> part 0, 9 -> part 1, 5 -> part 0 (tie: lower part), 3 -> part 1 (9 < 14), 1 -> part 1 (12 < 14)
    assert balance([5, 9, 1, 9, 3], 2) == [[0, 1], [2, 3, 4]]
    assert balance([4, 4, 4], 1) == [[0, 1, 2]]
    assert balance([7], 3) == [[0], [], []]
    parts = balance(list(range(1, 40)), 4)
    assert sorted(i for part in parts for i in part) == list(range(39))
    loads = [sum(i + 1 for i in part) for part in parts]
    assert max(loads) - min(loads) <= 39
    with pytest.raises(ValueError):
        balance([1], 0)


# tasks run in spawned worker processes: module-level so that they can be pickled by name
def report_then_finish(count: int, report) -> None:
    for _ in range(count):
        report(10)


def fail_with_message(report) -> None:
    raise ConvertError("tensor x in shard y is bad", 2)


def write_pid_then_sleep(pid_dir: str, report) -> None:
    Path(pid_dir, str(os.getpid())).write_text("")
    time.sleep(120)


def write_pid_then_die(pid_dir: str, report) -> None:
    Path(pid_dir, str(os.getpid())).write_text("")
    while len(list(Path(pid_dir).iterdir())) < 2:  # wait for the sleeping sibling to be up
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)


def sleep_or_die(pid_dir: str, die: bool, report) -> None:
    (write_pid_then_die if die else write_pid_then_sleep)(pid_dir, report)


def full_disk(report) -> None:
    raise OSError(28, "No space left on device", "/data/out/model-00001.safetensors")


def test_pool_relays_progress_and_finishes():
    seen = []
    run_workers(report_then_finish, [(3,), (5,)], seen.append)
    assert sum(seen) == 80 and len(seen) == 8
    workers = [child.pid for child in psutil.Process().children() if "spawn_main" in " ".join(child.cmdline())]
    assert_gone(workers)  # (the resource tracker stays: it is this process's, not the pool's)


def test_pool_reports_a_worker_error_with_its_exit_code():
    with pytest.raises(ConvertError, match="worker 2 .*tensor x in shard y is bad") as caught:
        run_workers(fail_with_message, [()], lambda n: None, ["worker 2 (cpu)"])
    assert caught.value.exit_code == 2
    with pytest.raises(ConvertError, match="No space left on device.*free space and re-run to resume") as caught:
        run_workers(full_disk, [()], lambda n: None)
    assert caught.value.exit_code == 3


def test_pool_names_a_worker_killed_by_sigkill_and_stops_its_siblings(tmp_path):
    start = time.time()
    with pytest.raises(WorkerDied) as caught:
        run_workers(sleep_or_die, [(str(tmp_path), False), (str(tmp_path), True)], lambda n: None, ["worker 1 (cpu)", "worker 2 (cpu)"])
    assert time.time() - start < 60  # no waiting for the sleeper's 120 s
    message = str(caught.value)
    pids = [int(p.name) for p in tmp_path.iterdir()]
    assert "worker 2 (cpu) of 2" in message and "SIGKILL" in message and "re-run" in message
    assert any(f"pid {pid}" in message for pid in pids)
    assert caught.value.exit_code == 4
    assert_gone(pids)


POOL_UNDER_SIGTERM = textwrap.dedent("""
    import sys
    from converters.jobs.errors import Interrupted
    from converters.jobs.pool import run_workers
    sys.path[:0] = {tests!r}
    from test_jobs import write_pid_then_sleep
    try:
        run_workers(write_pid_then_sleep, [({pids!r},), ({pids!r},)], lambda n: None)
    except Interrupted as exc:
        print(exc, file=sys.stderr)
        sys.exit(exc.exit_code)
""")


def test_sigterm_to_the_parent_stops_and_joins_every_worker(tmp_path):
    script = POOL_UNDER_SIGTERM.format(tests=TEST_PATHS, pids=str(tmp_path))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 60
    while len(list(tmp_path.iterdir())) < 2 and time.time() < deadline:
        time.sleep(0.05)
    workers = [int(p.name) for p in tmp_path.iterdir()]
    assert len(workers) == 2, parent.stderr.read() if parent.poll() is not None else "workers did not start"
    descendants = [p.pid for p in psutil.Process(parent.pid).children(recursive=True)]
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 143
    assert "interrupted by SIGTERM" in parent.stderr.read()
    assert_gone(workers + descendants)


def test_no_worker_outlives_a_parent_killed_by_sigkill(tmp_path):
    script = POOL_UNDER_SIGTERM.format(tests=TEST_PATHS, pids=str(tmp_path))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 60
    while len(list(tmp_path.iterdir())) < 2 and time.time() < deadline:
        time.sleep(0.05)
    workers = [int(p.name) for p in tmp_path.iterdir()]
    assert len(workers) == 2
    parent.kill()
    parent.wait()
    assert_gone(workers)


def test_errors_map_to_their_exit_codes():
    assert as_convert_error(KeyboardInterrupt()).exit_code == 130
    assert Interrupted(signal.SIGTERM).exit_code == 143
    disk_full = as_convert_error(OSError(28, "No space left on device", "/d/f"))
    assert disk_full.exit_code == 3 and "/d/f" in str(disk_full) and "free space and re-run to resume" in str(disk_full)
    denied = as_convert_error(PermissionError(13, "Permission denied", "/d/g"))
    assert denied.exit_code == 3 and "/d/g" in str(denied) and "permissions" in str(denied)
    assert as_convert_error(ValueError("a bug")) is None


def destination(root: Path, **changes) -> Destination:
    fields = {"root": root, "state_dir": root / "release" / ".state", "identity": {"source": "/m", "drop_mtp": False}, **changes}
    return Destination(**fields)


def snapshot(path: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def test_check_reads_only_and_refuses_what_is_not_ours(tmp_path):
    dst = tmp_path / "dst"
    destination(dst).check()
    assert not dst.exists()
    (dst / "release" / ".state").mkdir(parents=True)  # what a kill right after mkdir leaves
    destination(dst).check()
    (dst / "notes.txt").write_text("mine")
    before = snapshot(dst)
    with pytest.raises(ConvertError, match="not empty .*notes.txt.*--overwrite"):
        destination(dst).check()
    destination(dst, overwrite=True).check()
    assert snapshot(dst) == before


def test_claim_records_identity_and_parts_and_refuses_a_mismatch(tmp_path):
    dst = tmp_path / "dst"
    with destination(dst, part=0, parts=2).claim():
        pass
    recorded = json.loads((dst / "release" / ".state" / CLAIM_FILE).read_text())
    assert recorded == {"identity": {"source": "/m", "drop_mtp": False}, "parts": 2}
    destination(dst, part=1, parts=2).check()
    before = snapshot(dst)
    with pytest.raises(ConvertError, match=r"converted in 2 parts .*--shard 1/3.*same N"):
        destination(dst, part=1, parts=3).check()
    with pytest.raises(ConvertError, match="another source or with other options .*drop_mtp: False there, True now"):
        destination(dst, identity={"source": "/m", "drop_mtp": True}).check()
    assert snapshot(dst) == before


HOLD_CLAIM = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from converters.jobs.claim import Destination
    root = Path(sys.argv[1])
    with Destination(root, root / "release" / ".state", {{"source": "/m", "drop_mtp": False}}, {part}, 2).claim():
        print("held", flush=True)
        time.sleep(60)
""")


def test_a_part_held_by_another_process_is_refused_naming_pid_and_host(tmp_path):
    dst = tmp_path / "dst"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_CLAIM.format(part=0), str(dst)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConvertError) as caught:
            with destination(dst, part=0, parts=2).claim():
                pass
        message = str(caught.value)
        assert f"pid {holder.pid}" in message and socket.gethostname() in message and "part 0/2" in message
        assert caught.value.exit_code == 2
        with destination(dst, part=1, parts=2).claim():  # another part of the same conversion runs alongside
            pass
    finally:
        holder.kill()
        holder.wait()
    with destination(dst, part=0, parts=2).claim():  # the lock dies with its process
        pass


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_in_a_log_is_plain_lines_every_five_percent():
    log = io.StringIO()
    progress = Progress("fp8->bf16", stream=log)
    update = progress.start(1000)
    for _ in range(100):
        update(10)
    progress.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) == 20 and lines[0].startswith("fp8->bf16: 0.00 of 0.00 GB (5%)") and "(100%)" in lines[-1]
    terminal = FakeTerminal()
    bar = Progress("fp8->bf16", stream=terminal)
    bar.start(1000)(1000)
    bar.close()
    assert "\r" in terminal.getvalue()  # tqdm's bar
    quiet = io.StringIO()
    silent = Progress("x", quiet=True, stream=quiet)
    silent.start(10)(10)
    silent.close()
    assert quiet.getvalue() == ""


def test_progress_line_after_thirty_seconds_without_five_percent(monkeypatch):
    clock = {"now": 100.0}
    monkeypatch.setattr("converters.jobs.progress.time.monotonic", lambda: clock["now"])
    log = io.StringIO()
    update = Progress("hf->mcore", stream=log).start(10**12)
    update(1)
    assert log.getvalue() == ""
    clock["now"] += 31
    update(1)
    assert log.getvalue().count("\n") == 1 and "hf->mcore: " in log.getvalue()


def test_only_the_temp_files_of_gone_processes_on_this_host_are_removed(tmp_path):
    """What a SIGKILL leaves (a temp of a dead pid) goes before a resume; a live writer's temp, one of another
    machine on a shared filesystem, or a file of another form stays."""
    live = temp_path(tmp_path, "model-00001.safetensors")
    dead = live.with_name(f"model-00002.safetensors~{socket.gethostname()}~999999999.tmp")
    elsewhere = live.with_name("model-00003.safetensors~another-host~999999999.tmp")
    foreign = tmp_path / "notes.tmp"
    for path in (live, dead, elsewhere, foreign):
        path.write_bytes(b"partial")
    remove_dead_temps(tmp_path)
    assert not dead.exists()
    assert live.exists() and elsewhere.exists() and foreign.exists()

