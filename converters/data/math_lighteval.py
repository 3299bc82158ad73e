"""`convert math-lighteval`: MATH-lighteval (parquet, JSON/JSONL or a saved `datasets` dir) -> verl parquet.

Each output row is what verl's GRPO trainer and its rule-based math scorer expect: a chat prompt
asking for a boxed answer, and the last boxed expression of the reference solution as ground truth.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from toolkit.errors import ConvertError

DATA_SOURCE = "DigitalLearningGmbH/MATH-lighteval"
INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
COLUMNS = ("problem", "level", "type", "solution")
SPLITS = ("train", "test")
_BOX_COMMANDS = ("\\boxed", "\\fbox")


class DataError(ConvertError, ValueError):
    """The input cannot be read as MATH-lighteval; the message names the file, row and column."""


def last_boxed(solution: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\boxed x`, or `\\fbox{...}`), braces matched; None if none."""
    for command in _BOX_COMMANDS:
        start = solution.rfind(command)
        while start >= 0:
            answer = _box_content(solution, start + len(command))
            if answer is not None:
                return answer
            start = solution.rfind(command, 0, start)
    return None


def _box_content(text: str, position: int) -> str | None:
    after_space = len(text) - len(text[position:].lstrip())
    if text.startswith("{", after_space):  # "\boxed {6}": TeX ignores the space, so the braces still delimit
        position = after_space
    elif after_space > position:  # "\boxed 5$": up to the closing dollar sign, as verl reads it
        return text[after_space:].split("$")[0].strip() or None
    else:
        return None
    depth = 0
    for index in range(position, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                answer = text[position + 1 : index].strip()
                return answer or None
    return None  # unbalanced braces


def verl_schema():
    """The parquet schema of verl's RL datasets (explicit, so an empty split still has it)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("data_source", pa.string()),
            ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
            ("ability", pa.string()),
            ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
            ("extra_info", pa.struct([("split", pa.string()), ("index", pa.int64())])),
        ]
    )


def to_verl_row(row: dict[str, Any], split: str, index: int) -> dict[str, Any] | None:
    """The verl row for one MATH row, or None when the solution has no usable boxed answer."""
    answer = last_boxed(row["solution"])
    if answer is None:
        return None
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": f"{row['problem']} {INSTRUCTION}"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {"split": split, "index": index},
    }


def _split_of(path: Path) -> str | None:
    name = path.name.lower()
    for split in SPLITS:
        if name.startswith(split) or f"{split}-" in name or f"{split}." in name or f"_{split}" in name or path.parent.name == split:
            return split
    return None


def find_inputs(path: Path) -> dict[str, list[Path]]:
    """Input files per split: a file, a dir of parquet/JSON/JSONL/arrow files, or a saved datasets dir."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    found: dict[str, list[Path]] = {}
    for candidate in candidates:
        if candidate.suffix not in (".parquet", ".json", ".jsonl", ".arrow") or candidate.name in ("dataset_info.json", "state.json", "dataset_dict.json"):
            continue
        split = _split_of(candidate) or ("train" if path.is_file() else None)
        if split:
            found.setdefault(split, []).append(candidate)
    if not found:
        raise DataError(f"{path}: no train/test parquet, JSON, JSONL or arrow files found (file names must name the split)")
    return found


def read_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of one input file as dicts (parquet and arrow through pyarrow, JSON/JSONL as text)."""
    if path.suffix in (".parquet", ".arrow"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        if path.suffix == ".parquet":
            table = pq.read_table(path)
        else:
            with pa.memory_map(str(path)) as source:
                try:
                    table = pa.ipc.open_stream(source).read_all()
                except pa.ArrowInvalid:
                    table = pa.ipc.open_file(source).read_all()
        yield from table.to_pylist()
        return
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix == ".json" and stripped.startswith("["):
        yield from json.loads(text)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {number} is not JSON ({exc.msg})") from exc


@dataclass
class SplitReport:
    rows: int = 0
    written: int = 0
    skipped: int = 0
    skipped_examples: list[int] = field(default_factory=list)


def convert(src: Path, dst: Path, strict: bool = False) -> dict[str, SplitReport]:
    """Write DST/train.parquet and DST/test.parquet; returns per-split counts."""
    reports: dict[str, SplitReport] = {}
    rows_by_split: dict[str, list[dict[str, Any]]] = {}
    for split, files in sorted(find_inputs(src).items()):
        report = reports.setdefault(split, SplitReport())
        rows = rows_by_split.setdefault(split, [])
        for file in files:
            for row in read_rows(file):
                missing = [column for column in ("problem", "solution") if not isinstance(row.get(column), str)]
                if missing:
                    raise DataError(f"{file}: row {report.rows} lacks text column(s) {', '.join(missing)} (has {', '.join(sorted(row))})")
                converted = to_verl_row(row, split, report.rows)
                if converted is None:
                    if strict:
                        raise DataError(f"{file}: row {report.rows} has no usable \\boxed{{}} answer in its solution (--strict)")
                    report.skipped += 1
                    if len(report.skipped_examples) < 5:
                        report.skipped_examples.append(report.rows)
                else:
                    rows.append(converted)
                report.rows += 1
        report.written = len(rows)
    write_splits(dst, rows_by_split)
    return reports


def write_splits(dst: Path, rows_by_split: dict[str, list[dict[str, Any]]]) -> None:
    """DST/<split>.parquet in verl's schema for every split, each written atomically once all are encoded."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from atomicio import atomic_write_bytes

    outputs = {}
    for split, rows in rows_by_split.items():
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows, schema=verl_schema()), sink)
        outputs[split] = sink.getvalue().to_pybytes()
    Path(dst).mkdir(parents=True, exist_ok=True)
    for split, data in outputs.items():
        atomic_write_bytes(Path(dst) / f"{split}.parquet", data)


def print_counts(reports: dict, as_json: bool, line) -> None:
    """The per-split counts of a data command: JSON, or `line(split, report)` per split."""
    if as_json:
        print(json.dumps({split: asdict(report) for split, report in reports.items()}, indent=2))
    else:
        for split, report in reports.items():
            print(line(split, report))


def lighteval_command(src: Path, dst: Path, strict: bool, as_json: bool) -> int:
    """`convert math-lighteval`: write the splits and print their counts."""
    print_counts(convert(src, dst, strict), as_json,
                 lambda split, report: f"{split}: {report.written} rows written to {dst / (split + '.parquet')}, "
                 f"{report.skipped} skipped (no boxed answer)")
    return 0
