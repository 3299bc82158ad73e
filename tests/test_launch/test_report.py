"""launch report: logs written with verl's own console formatter -> metrics.csv and PNG plots."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from launch.report import find_logs, make_report, parse_line, read_metrics

pytest.importorskip("matplotlib")
aggregate_logger = pytest.importorskip("verl.utils.logger.aggregate_logger")

VAL_KEY = "val-core/DigitalLearningGmbH/MATH-lighteval/reward/mean@1"


def training_metrics(step: int, rng: np.random.Generator) -> dict:
    """The kinds of values verl logs: numpy scalars, Python floats and ints, and a non-number (dropped)."""
    return {
        "training/global_step": step,
        "critic/score/mean": np.float64(0.2 + 0.01 * step + rng.normal(0, 0.01)),
        "critic/score/max": np.float64(1.0),
        "response_length/mean": np.float32(900 - 3 * step),
        "actor/kl_loss": float(rng.uniform(0, 1e-3)),
        "actor/entropy": np.float64(0.6 - 0.002 * step),
        "actor/pg_loss": np.float64(-0.01),
        "timing_s/step": 812.5,
        "perf/throughput": np.int64(1234),
        "actor/lr": 2e-07,
        "note": "text is not a metric",
    }


def write_verl_log(path: Path, steps: range, test_freq: int = 5, seed: int = 0, prefix: str = "(TaskRunner pid=4242) ") -> dict[int, dict]:
    """A console log as `launch grpo` tees it: Ray's actor prefix, colour codes, other output between steps."""
    rng = np.random.default_rng(seed)
    logged: dict[int, dict] = {}
    lines = ["2026-11-24 03:00:00 INFO worker.py -- Connecting to existing Ray cluster at address: 127.0.0.1:6379",
             "\x1b[36m(TaskRunner pid=4242)\x1b[0m Training Progress:   0%|          | 0/40"]
    for step in steps:
        data = {} if step == steps[0] else training_metrics(step, rng)
        if step % test_freq == 0:
            data[VAL_KEY] = np.float64(0.3 + 0.01 * step)
        logged[step] = data
        lines.append(prefix + aggregate_logger.concat_dict_to_str(data, step=step))
        lines.append(f"{prefix}(WorkerDict pid=99) INFO: some worker output with a colon: step done")
    path.write_text("\n".join(lines) + "\n")
    return logged


def numbers(data: dict) -> dict[str, float]:
    return {key: float(value) for key, value in data.items() if not isinstance(value, str)}


def test_a_verl_console_line_parses_to_its_numbers():
    rng = np.random.default_rng(1)
    data = training_metrics(7, rng)
    step, values = parse_line("\x1b[36m(TaskRunner pid=1)\x1b[0m " + aggregate_logger.concat_dict_to_str(data, step=7))
    assert step == 7 and values == numbers(data)
    assert parse_line("INFO step: not a metrics line") is None
    assert parse_line("Training Progress: 3%") is None


def test_report_writes_every_metric_of_every_step_and_the_plots(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    logged = write_verl_log(run / "train.log", range(0, 41))
    report = make_report(run)
    out = run / "report"
    with open(out / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == list(range(0, 41))
    for row in rows:
        expected = numbers(logged[int(row["step"])])
        got = {key: float(value) for key, value in row.items() if key != "step" and value != ""}
        assert got == expected, row["step"]
    assert report["steps"] == 41 and report["restarts"] == 0
    assert report["panels"]["critic/score/mean"]["panel"] == "reward"
    assert report["panels"][VAL_KEY] == {"panel": "val_accuracy", "first": 0.3, "last": 0.3 + 0.01 * 40, "max": 0.3 + 0.01 * 40,
                                         "min": 0.3, "points": 9}
    assert report["missing_panels"] == []
    from matplotlib.image import imread

    for name in ("reward", "val_accuracy", "response_length", "kl", "entropy", "overview"):
        image = imread(out / f"{name}.png")
        assert image.ndim == 3 and image.shape[0] > 200 and image.std() > 0.01, name  # a real picture, not blank


def test_a_resumed_run_keeps_the_newer_values(tmp_path):
    log = tmp_path / "train.log"
    first = write_verl_log(log, range(0, 12), seed=1)
    resumed_path = tmp_path / "resumed.log"
    resumed = write_verl_log(resumed_path, range(10, 16), seed=2)
    log.write_text(log.read_text() + resumed_path.read_text())
    metrics = read_metrics([log])
    assert metrics.restarts == 1
    assert metrics.steps[11] == numbers(resumed[11])
    assert metrics.steps[9] == numbers(first[9])
    assert metrics.steps[10] == {**numbers(first[10]), **numbers(resumed[10])}


def test_only_some_panels_present(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("step:1 - critic/rewards/mean:0.5 - actor/ppo_kl:np.float64(0.001)\nstep:2 - critic/rewards/mean:0.75\n")
    report = make_report(log, tmp_path / "out")
    assert set(report["panels"]) == {"critic/rewards/mean", "actor/ppo_kl"}
    assert report["missing_panels"] == ["val_accuracy", "response_length", "entropy"]
    assert sorted(Path(p).name for p in report["files"]) == ["kl.png", "metrics.csv", "overview.png", "reward.png"]


def test_run_dir_without_train_log_reads_every_log(tmp_path):
    (tmp_path / "b.log").write_text("step:2 - x:2\n")
    (tmp_path / "a.log").write_text("step:1 - x:1\n")
    assert [p.name for p in find_logs(tmp_path)] == ["a.log", "b.log"]


def test_cli_exit_codes_and_json(tmp_path):
    cli = [sys.executable, "-m", "launch.cli", "report"]
    missing = subprocess.run([*cli, str(tmp_path / "nope")], capture_output=True, text=True)
    assert missing.returncode == 2 and "no such file or directory" in missing.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train.log").write_text("nothing here\n")
    none = subprocess.run([*cli, str(empty)], capture_output=True, text=True)
    assert none.returncode == 1 and "no verl step lines" in none.stderr and "trainer.logger" in none.stderr
    run = tmp_path / "run"
    run.mkdir()
    write_verl_log(run / "train.log", range(0, 6))
    done = subprocess.run([*cli, str(run), "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["last_step"] == 5
    text = subprocess.run([*cli, str(run)], capture_output=True, text=True)
    assert "6 steps (0..5)" in text.stdout and "critic/score/mean" in text.stdout
