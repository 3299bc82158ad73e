"""convert math-lighteval: every input form, verl's schema, skipped rows, and verl's own scorer."""

from __future__ import annotations

import json
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from convert_cli import convert as run_convert

from converters.data.math_lighteval import INSTRUCTION, last_boxed
from converters.testing import math_sample_rows

EXPECTED_TRAIN_ANSWERS = ["2", "\\frac{3}{4}", "3", "4", "(-2,2)", "2", "1"]


def run(*args: str) -> subprocess.CompletedProcess:
    return run_convert("math-lighteval", *args, quiet=False)


def write_inputs(root, form: str):
    rows = math_sample_rows()
    root.mkdir(parents=True, exist_ok=True)
    if form == "parquet":
        for split, split_rows in rows.items():
            (root / "data").mkdir(exist_ok=True)
            pq.write_table(pa.Table.from_pylist(split_rows), root / "data" / f"{split}-00000-of-00001.parquet")
    elif form == "jsonl":
        for split, split_rows in rows.items():
            (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split_rows))
    elif form == "json":
        for split, split_rows in rows.items():
            (root / f"{split}.json").write_text(json.dumps(split_rows))
    else:
        datasets = pytest.importorskip("datasets")
        datasets.DatasetDict({s: datasets.Dataset.from_list(r) for s, r in rows.items()}).save_to_disk(str(root))
    return root


@pytest.mark.parametrize("form", ["parquet", "jsonl", "json", "datasets"])
def test_every_input_form(tmp_path, form):
    src = write_inputs(tmp_path / "in", form)
    result = run("--src", str(src), "--dst", str(tmp_path / "out"), "--json")
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout)
    assert counts["train"]["rows"] == 9 and counts["train"]["written"] == 7 and counts["train"]["skipped"] == 2
    assert counts["test"]["written"] == 2
    train = pq.read_table(tmp_path / "out" / "train.parquet").to_pylist()
    assert [row["reward_model"]["ground_truth"] for row in train] == EXPECTED_TRAIN_ANSWERS
    first = train[0]
    assert first["data_source"] == "DigitalLearningGmbH/MATH-lighteval"
    assert first["ability"] == "math"
    assert first["prompt"] == [{"role": "user", "content": "What is $1+1$? " + INSTRUCTION}]
    assert first["reward_model"]["style"] == "rule"
    assert first["extra_info"] == {"split": "train", "index": 0}
    assert [row["extra_info"]["index"] for row in train] == [0, 1, 2, 3, 4, 5, 6]


def test_verl_scores_each_ground_truth_as_correct(tmp_path):
    scorer = pytest.importorskip("verl.utils.reward_score")
    src = write_inputs(tmp_path / "in", "jsonl")
    assert run("--src", str(src), "--dst", str(tmp_path / "out")).returncode == 0
    for split in ("train", "test"):
        for row in pq.read_table(tmp_path / "out" / f"{split}.parquet").to_pylist():
            answer = "So the answer is $\\boxed{" + row["reward_model"]["ground_truth"] + "}$."
            score = scorer.default_compute_score(row["data_source"], answer, row["reward_model"]["ground_truth"])
            assert float(score if not isinstance(score, dict) else score["score"]) == 1.0, row


def test_strict_refuses_rows_without_a_box(tmp_path):
    src = write_inputs(tmp_path / "in", "jsonl")
    result = run("--src", str(src), "--dst", str(tmp_path / "out"), "--strict")
    assert result.returncode == 2 and "row 7" in result.stderr and "--strict" in result.stderr
    assert not (tmp_path / "out" / "train.parquet").exists()


def test_bad_inputs(tmp_path):
    assert "no such file" in run("--src", str(tmp_path / "nope"), "--dst", str(tmp_path / "o")).stderr
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train.jsonl").write_text('{"problem": "x", "solution": "\\\\boxed{1}"}\nnot json\n')
    result = run("--src", str(tmp_path / "bad"), "--dst", str(tmp_path / "o"))
    assert result.returncode == 2 and "line 2 is not JSON" in result.stderr
    (tmp_path / "bad" / "train.jsonl").write_text('{"question": "x", "answer": "1"}\n')
    result = run("--src", str(tmp_path / "bad"), "--dst", str(tmp_path / "o"))
    assert result.returncode == 2 and "lacks text column(s) problem, solution" in result.stderr


@pytest.mark.parametrize(
    "solution, answer",
    [
        ("$\\boxed{2}$", "2"),
        ("\\boxed{\\frac{a}{b}}", "\\frac{a}{b}"),
        ("\\boxed{1} then \\boxed{\\{x\\}}", "\\{x\\}"),
        ("\\boxed 7$", "7"),
        ("$\\boxed {6}$", "6"),
        ("\\boxed\n{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\fbox{9}", "9"),
        ("no box", None),
        ("\\boxed{}", None),
        ("\\boxed{unclosed", None),
    ],
)
def test_last_boxed(solution, answer):
    assert last_boxed(solution) == answer


def test_space_before_the_brace_gives_the_bare_answer_verl_scores_correct(tmp_path):
    scorer = pytest.importorskip("verl.utils.reward_score")
    (tmp_path / "in").mkdir()
    row = {"problem": "What is $2+4$?", "level": "Level 1", "type": "Algebra", "solution": "$2+4=\\boxed {6}$."}
    (tmp_path / "in" / "train.jsonl").write_text(json.dumps(row) + "\n")
    result = run("--src", str(tmp_path / "in"), "--dst", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    [written] = pq.read_table(tmp_path / "out" / "train.parquet").to_pylist()
    truth = written["reward_model"]["ground_truth"]
    assert truth == "6"
    for answer, expected in (("The sum is $\\boxed{6}$.", 1.0), ("The sum is $\\boxed{7}$.", 0.0)):
        score = scorer.default_compute_score(written["data_source"], answer, truth)
        assert float(score if not isinstance(score, dict) else score["score"]) == expected, answer
