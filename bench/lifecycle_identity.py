"""The job lifecycle refactor changed no output byte: the old and the new code on the same inputs.

Runs `convert fp8-bf16`, `convert hf-mcore` and `convert mcore-hf` from two source trees (the base
commit and this one) on a generated tiny DeepSeek-V3 FP8 checkpoint, each into the SAME destination
path (moved aside after each run: `.metadata` records the path, the finished marks the source), and
compares every output file with `cmp` for serial, --workers and --shard runs. Then the documented
cases, exit code and message: a finished destination, a non-empty one holding something else, a
run killed mid-way (SIGKILL at the Nth rename of an output) and re-run, bad input.

mcore-hf follows the other two's policy now, so its refusal of a finished or interrupted
destination is expected to change (listed in EXPECTED_CHANGES); anything else that differs fails.

    python bench/lifecycle_identity.py --old /tmp/base-jobs [--new .] [--work /tmp/lifecycle-identity]

(--old: a checkout of the base commit, e.g. `git archive 510eaa5 | tar -x -C /tmp/base-jobs`.)
Exit 0 when every output is identical and every message difference is an expected one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Run `convert` in a child with one tree on the path; optionally SIGKILL itself at the Nth os.replace onto
# a name containing a pattern (an output landing), and make mcore-hf's 5 GB shards small enough to be several.
RUNNER = """
import os, signal, sys
kill_at, pattern = int(os.environ.get("BENCH_KILL_AT", "0")), os.environ.get("BENCH_KILL_PATTERN", "")
if os.environ.get("BENCH_SHARD_BYTES"):
    import converters.mcore.to_hf as to_hf
    to_hf.SHARD_BYTES = int(os.environ["BENCH_SHARD_BYTES"])
if kill_at:
    real_replace, landed = os.replace, [0]
    def replace(src, dst, *args, **kwargs):
        if pattern in os.fspath(dst):
            landed[0] += 1
            if landed[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst, *args, **kwargs)
    os.replace = replace
from converters.cli import main
code = main(sys.argv[1:])
sys.stdout.flush(); sys.stderr.flush()
os._exit(code)
"""

SHARD_BYTES = 150_000  # the tiny model's mcore-hf export in several shards
MARKS = {".fp8-bf16-source.json", ".hf-mcore-source.json", ".mcore-hf-source.json"}
# (command, case) -> why the message or exit code may differ: mcore-hf's new policy
EXPECTED_CHANGES = {
    ("mcore-hf", "finished destination"): "a finished export is a no-op (exit 0), was refused as not empty (exit 2)",
    ("mcore-hf", "non-matching destination"): "the claim's message (names the entries), was 'is not empty'",
    ("mcore-hf", "killed, then re-run"): "resumes (exit 0), was refused as not empty (exit 2)",
}


def convert(tree: Path, args: list[str], kill_at: int = 0, kill_pattern: str = "") -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(tree), "BENCH_KILL_AT": str(kill_at), "BENCH_KILL_PATTERN": kill_pattern,
           "BENCH_SHARD_BYTES": str(SHARD_BYTES)}
    result = subprocess.run([sys.executable, "-c", RUNNER, *args, "--quiet"], capture_output=True, text=True, env=env, cwd=tree)
    return result.returncode, normalise(result.stdout + result.stderr)


def normalise(text: str) -> str:
    """Timings and rates vary from run to run; the rest of a message must not."""
    text = re.sub(r"\d+\.\d+ s\b", "T s", text)
    text = re.sub(r"\d+\.\d+ (GB|MB)/s", r"R \1/s", text)
    text = re.sub(r"by pid \d+", "by pid P", text)
    return text.strip()


def files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


def compare_trees(old: Path, new: Path) -> list[str]:
    """Every file compared with cmp; the finished marks also as JSON. Returns the problems."""
    problems, old_files, new_files = [], files(old), files(new)
    for name in sorted(old_files.keys() | new_files.keys()):
        if name not in old_files or name not in new_files:
            side = "new" if name in new_files else "old"
            if Path(name).name == ".mcore-hf-source.json" and side == "new":
                continue  # mcore-hf's finished mark is new
            problems.append(f"{name}: only in the {side} output")
            continue
        same = subprocess.run(["cmp", "-s", str(old_files[name]), str(new_files[name])]).returncode == 0
        if not same and Path(name).name in MARKS:
            if json.loads(old_files[name].read_text()) == json.loads(new_files[name].read_text()):
                print(f"    {name}: same JSON, bytes differ (one finished-mark format: a trailing newline)")
                continue
        if not same:
            problems.append(f"{name}: differs (cmp)")
    return problems


class Bench:
    def __init__(self, old: Path, new: Path, work: Path) -> None:
        self.trees = {"old": old, "new": new}
        self.work = work
        self.failures: list[str] = []

    def run_both(self, label: str, steps: list[tuple[list[str], int, str]], dst_name: str = "dst",
                 setup=None) -> dict[str, list[tuple[int, str]]]:
        """Each tree runs the steps into the same dst path; the outputs are moved to <label>/<tree>."""
        outputs = {}
        for tree_name, tree in self.trees.items():
            dst = self.work / dst_name
            shutil.rmtree(dst, ignore_errors=True)
            if setup is not None:
                setup(dst, tree_name)
            outputs[tree_name] = [convert(tree, [arg.replace("{dst}", str(dst)) for arg in args], kill_at, pattern)
                                  for args, kill_at, pattern in steps]
            keep = self.work / "outputs" / label / tree_name
            shutil.rmtree(keep, ignore_errors=True)
            keep.parent.mkdir(parents=True, exist_ok=True)
            if dst.exists():
                shutil.move(str(dst), keep)
        return outputs

    def identical(self, label: str, steps: list[tuple[list[str], int, str]], against: str | None = None) -> None:
        """Outputs byte-identical (against another label's old output, for runs the old code cannot make)."""
        outputs = self.run_both(label, steps)
        codes = {tree: [code for code, _ in runs] for tree, runs in outputs.items()}
        old = self.work / "outputs" / (against or label) / "old"
        new = self.work / "outputs" / label / "new"
        problems = compare_trees(old, new)
        count = len(files(new))
        if against is None and codes["old"] != codes["new"]:
            problems.append(f"exit codes {codes['old']} (old) vs {codes['new']} (new)")
        if any(code not in (0, 1) for code in codes["new"]):
            problems.append(f"new exit codes {codes['new']}: {outputs['new']}")
        print(f"  {label}: {count} files, exit codes {codes['new']}: " + ("identical" if not problems else "; ".join(problems)))
        self.failures += [f"{label}: {problem}" for problem in problems]

    def messages(self, command: str, case: str, steps, setup=None, compare_output_to: str | None = None) -> None:
        outputs = self.run_both(f"{command} {case}", steps, setup=setup)
        same = outputs["old"] == outputs["new"]
        expected = EXPECTED_CHANGES.get((command, case))
        verdict = "same" if same else (f"changed as intended: {expected}" if expected else "DIFFERENT")
        print(f"  {command} / {case}: {verdict}")
        for tree in ("old", "new"):
            for code, text in outputs[tree]:
                print(f"      {tree}: exit {code}: {text.splitlines()[-1] if text else ''}")
        if not same and not expected:
            self.failures.append(f"{command} / {case}: messages or exit codes differ")
        if compare_output_to is not None:
            reference = self.work / "outputs" / compare_output_to / "old"
            for tree in ("old", "new") if same else ("new",):
                problems = compare_trees(reference, self.work / "outputs" / f"{command} {case}" / tree)
                print(f"      {tree} output after the re-run vs an uninterrupted run: " + ("identical" if not problems else "; ".join(problems)))
                self.failures += [f"{command} / {case} ({tree}): {problem}" for problem in problems]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="a checkout of the base commit")
    parser.add_argument("--new", type=Path, default=REPO, help="the tree under test (default: this one)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lifecycle-identity"))
    args = parser.parse_args()
    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sys.path.insert(0, str(args.new.resolve()))
    from converters.testing import make_fp8_checkpoint

    src, mcore_src = work / "fp8", work / "mcore-src"
    make_fp8_checkpoint(src, shards=4)
    bench = Bench(args.old.resolve(), args.new.resolve(), work)
    fp8 = ["fp8-bf16", "--src", str(src), "--dst", "{dst}"]
    hf_mcore = ["hf-mcore", "--src", str(src), "--dst", "{dst}", "--bin-mb", "1"]
    mcore_hf = ["mcore-hf", "--src", str(mcore_src), "--hf-config", str(src), "--dst", "{dst}"]

    print("outputs, old vs new code, same destination path, compared with cmp:")
    bench.identical("fp8-bf16 serial", [(fp8, 0, "")])
    bench.identical("fp8-bf16 --workers 2", [([*fp8, "--workers", "2", "--device", "cpu"], 0, "")])
    bench.identical("fp8-bf16 --shard 0/2, 1/2", [([*fp8, "--shard", "0/2"], 0, ""), ([*fp8, "--shard", "1/2"], 0, "")])
    bench.identical("hf-mcore serial", [(hf_mcore, 0, "")])
    bench.identical("hf-mcore --workers 2", [([*hf_mcore, "--workers", "2"], 0, "")])
    bench.identical("hf-mcore --shard 0/2, 1/2", [([*hf_mcore, "--shard", "0/2"], 0, ""), ([*hf_mcore, "--shard", "1/2"], 0, "")])
    shutil.copytree(work / "outputs" / "hf-mcore serial" / "old", mcore_src)  # mcore-hf reads what hf-mcore wrote
    bench.identical("mcore-hf serial", [(mcore_hf, 0, "")])
    bench.identical("mcore-hf --workers 2", [([*mcore_hf, "--workers", "2"], 0, "")], against="mcore-hf serial")

    print("documented cases, old vs new: exit code and message (last line shown)")

    def finished(reference: str):
        """The destination as the same tree's own uninterrupted run left it."""
        return lambda dst, tree: shutil.copytree(work / "outputs" / reference / tree, dst)

    def foreign(dst: Path, tree: str) -> None:
        dst.mkdir(parents=True)
        (dst / "notes.txt").write_text("mine")

    for command, steps, reference, landing in (
        ("fp8-bf16", fp8, "fp8-bf16 serial", "model-0000"),
        ("hf-mcore", hf_mcore, "hf-mcore serial", ".results"),
        ("mcore-hf", mcore_hf, "mcore-hf serial", "model-0000"),
    ):
        bench.messages(command, "finished destination", [(steps, 0, "")], setup=finished(reference))
        bench.messages(command, "non-matching destination", [(steps, 0, "")], setup=foreign)
        bench.messages(command, "killed, then re-run", [(steps, 3, landing), (steps, 0, "")], compare_output_to=reference)
    bad = work / "bad"
    shutil.copytree(src, bad)
    shard = bad / "model-00002-of-00004.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    bench.messages("fp8-bf16", "bad input (truncated shard)", [(["fp8-bf16", "--src", str(bad), "--dst", "{dst}"], 0, "")])
    bench.messages("hf-mcore", "bad input (truncated shard)", [(["hf-mcore", "--src", str(bad), "--dst", "{dst}"], 0, "")])
    (work / "empty").mkdir()
    bench.messages("mcore-hf", "bad input (no .metadata)",
                   [(["mcore-hf", "--src", str(work / "empty"), "--hf-config", str(src), "--dst", "{dst}"], 0, "")])

    print("new code on the old code's finished outputs (an upgrade finds them finished):")
    for command, steps, reference in (("fp8-bf16", fp8, "fp8-bf16 serial"), ("hf-mcore", hf_mcore, "hf-mcore serial")):
        dst = work / "dst"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(work / "outputs" / reference / "old", dst)
        code, text = convert(bench.trees["new"], [arg.replace("{dst}", str(dst)) for arg in [*steps, "--json"]])
        nothing = code == 0 and (json.loads(text).get("shards_converted", json.loads(text).get("bins_written")) == 0)
        print(f"  {command}: exit {code}, " + ("nothing rewritten" if nothing else f"UNEXPECTED: {text}"))
        if not nothing:
            bench.failures.append(f"{command}: the new code does not take the old finished output as finished")

    print("result: " + ("every output identical; message changes only where intended" if not bench.failures else
                        f"{len(bench.failures)} problem(s):\n  " + "\n  ".join(bench.failures)))
    return 0 if not bench.failures else 1


if __name__ == "__main__":
    sys.exit(main())
