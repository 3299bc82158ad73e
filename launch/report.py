"""`launch report`: verl's console metrics from a run's log to a CSV and PNG plots against step.

verl's console logger prints one line per step, `step:N - key:value - key:value ...` (numbers only,
through `pprint.pformat`, so numpy scalars read `np.float64(0.5)`). Under Ray the line may carry a
`(TaskRunner pid=...)` prefix and colour codes. Lines of the same step are merged; a step seen again
(a resumed run) takes the newer values.
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

STEP_LINE = re.compile(r"(?:^|[\s)])step:(\d+) - (.*)$")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
NUMBER = re.compile(r"^(?:np\.\w+\((.*)\)|tensor\((.*?)(?:, .*)?\)|(.*))$")

# The panels: a title, the y label, and the keys that feed it (the first present wins; a pattern takes
# every key it matches, e.g. the validation accuracy of each data source).
PANELS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("reward", "reward (mean score)", "mean score", ("critic/score/mean", "critic/rewards/mean")),
    ("val_accuracy", "validation accuracy", "accuracy", (r"re:^val-core/.+/(acc|reward)/mean@\d+$",)),
    ("response_length", "response length", "tokens", ("response_length/mean",)),
    ("kl", "KL", "KL", ("actor/kl_loss", "actor/ppo_kl", "critic/kl")),
    ("entropy", "entropy", "entropy", ("actor/entropy", "actor/entropy_loss")),
)


class ReportError(RuntimeError):
    """The log could not be read or holds no metrics; the message says which file and what to do."""


@dataclass
class Metrics:
    steps: dict[int, dict[str, float]] = field(default_factory=dict)
    lines: int = 0
    restarts: int = 0  # times the step count went backwards (a resumed or restarted run)

    @property
    def keys(self) -> list[str]:
        return sorted({key for values in self.steps.values() for key in values})

    def series(self, key: str) -> tuple[list[int], list[float]]:
        points = [(step, values[key]) for step, values in sorted(self.steps.items()) if key in values]
        return [p[0] for p in points], [p[1] for p in points]


def parse_value(text: str) -> float | None:
    match = NUMBER.match(text.strip())
    raw = next(group for group in match.groups() if group is not None)
    try:
        return float(raw)
    except ValueError:
        return None


def parse_line(line: str) -> tuple[int, dict[str, float]] | None:
    """(step, metrics) of one console line of verl's, or None for any other line."""
    match = STEP_LINE.search(ANSI.sub("", line.rstrip("\r\n")))
    if not match:
        return None
    values = {}
    for item in match.group(2).split(" - "):
        key, sep, text = item.rpartition(":")
        value = parse_value(text) if sep and key else None
        if value is not None:
            values[key.strip()] = value
    return int(match.group(1)), values


def read_metrics(logs: list[Path]) -> Metrics:
    metrics = Metrics()
    last_step = -1
    for log in logs:
        with open(log, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                parsed = parse_line(line)
                if parsed is None:
                    continue
                step, values = parsed
                metrics.lines += 1
                if step < last_step:
                    metrics.restarts += 1
                last_step = step
                metrics.steps.setdefault(step, {}).update(values)
    return metrics


def find_logs(run: Path) -> list[Path]:
    """A log file, or a run dir: its `train.log` (what `launch grpo` writes), else every `*.log` in it."""
    if run.is_file():
        return [run]
    if not run.is_dir():
        raise ReportError(f"{run}: no such file or directory (give a run dir of `launch grpo` or a log file)")
    if (run / "train.log").is_file():
        return [run / "train.log"]
    logs = sorted(p for p in run.glob("*.log") if p.is_file())
    if not logs:
        raise ReportError(f"{run}: no train.log and no *.log file in it")
    return logs


def panel_keys(keys: list[str], sources: tuple[str, ...]) -> list[str]:
    for source in sources:
        if source.startswith("re:"):
            pattern = re.compile(source[3:])
            found = [key for key in keys if pattern.match(key)]
        else:
            found = [source] if source in keys else []
        if found:
            return found
    return []


def write_csv(metrics: Metrics, path: Path) -> None:
    """One row per step, one column per metric (empty where a step did not log it); written atomically."""
    keys = metrics.keys
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", *keys])
        for step, values in sorted(metrics.steps.items()):
            writer.writerow([step, *(repr(values[key]) if key in values else "" for key in keys)])
    partial.replace(path)


def plot(metrics: Metrics, out: Path) -> dict[str, list[str]]:
    """One PNG per panel that has data, and `overview.png` with all of them; returns panel -> keys."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    keys = metrics.keys
    chosen = {name: panel_keys(keys, sources) for name, _, _, sources in PANELS}
    shown = [(name, title, ylabel) for name, title, ylabel, _ in PANELS if chosen[name]]
    if not shown:
        return chosen
    overview, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.4), squeeze=False)
    for column, (name, title, ylabel) in enumerate(shown):
        single, single_axis = plt.subplots(figsize=(6, 4))
        for axis in (single_axis, axes[0][column]):
            for key in chosen[name]:
                steps, values = metrics.series(key)
                finite = [(s, v) for s, v in zip(steps, values, strict=True) if math.isfinite(v)]
                label = key.split("/", 1)[1] if key.startswith("val-core/") else key
                axis.plot([s for s, _ in finite], [v for _, v in finite], marker="o" if len(finite) < 30 else None, markersize=3, label=label)
            axis.set_title(title)
            axis.set_xlabel("step")
            axis.set_ylabel(ylabel)
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
        single.tight_layout()
        single.savefig(out / f"{name}.png", dpi=110)
        plt.close(single)
    overview.tight_layout()
    overview.savefig(out / "overview.png", dpi=90)
    plt.close(overview)
    return chosen


def make_report(run: Path, out: Path | None = None) -> dict:
    """Read the run's log, write `metrics.csv` and the plots under `out` (default RUN/report); return a summary."""
    logs = find_logs(run)
    metrics = read_metrics(logs)
    if not metrics.steps:
        raise ReportError(
            f"{', '.join(map(str, logs))}: no verl step lines (`step:N - key:value ...`); the console logger must be on "
            "(trainer.logger includes 'console', as `launch grpo` sets it)"
        )
    out = out or (run if run.is_dir() else run.parent) / "report"
    out.mkdir(parents=True, exist_ok=True)
    write_csv(metrics, out / "metrics.csv")
    chosen = plot(metrics, out)
    summary = {}
    for name, _, _, _ in PANELS:
        for key in chosen[name]:
            steps, values = metrics.series(key)
            summary[key] = {"panel": name, "first": values[0], "last": values[-1], "max": max(values), "min": min(values), "points": len(values)}
    return {
        "logs": [str(p) for p in logs],
        "out": str(out),
        "steps": len(metrics.steps),
        "first_step": min(metrics.steps),
        "last_step": max(metrics.steps),
        "metrics": len(metrics.keys),
        "restarts": metrics.restarts,
        "files": sorted(str(p) for p in out.iterdir() if p.suffix in (".csv", ".png")),
        "panels": summary,
        "missing_panels": [name for name, keys in chosen.items() if not keys],
    }


def print_summary(report: dict) -> None:
    print(f"{report['steps']} steps ({report['first_step']}..{report['last_step']}), {report['metrics']} metrics from "
          f"{', '.join(report['logs'])}" + (f"; the step count went back {report['restarts']} time(s): newer values kept" if report["restarts"] else ""))
    if report["panels"]:
        width = max(len(key) for key in report["panels"])
        print(f"  {'metric':<{width}}  {'first':>10} {'last':>10} {'min':>10} {'max':>10}")
        for key, row in report["panels"].items():
            print(f"  {key:<{width}}  {row['first']:>10.4g} {row['last']:>10.4g} {row['min']:>10.4g} {row['max']:>10.4g}")
    if report["missing_panels"]:
        print(f"  not in the log: {', '.join(report['missing_panels'])}")
    print(f"written to {report['out']}: " + ", ".join(Path(p).name for p in report["files"]))


def report_command(run: Path, out: Path | None, as_json: bool) -> int:
    """`launch report`: 0 written, 1 no step lines in the log, 2 no such run dir or log."""
    try:
        report = make_report(run, out)
    except ReportError as exc:
        print(f"launch report: error: {exc}", file=sys.stderr)
        return 2 if not run.exists() else 1
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_summary(report)
    return 0
