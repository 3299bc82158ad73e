"""`convert prompts`: your own prompts (JSONL, JSON or parquet) -> verl parquet, for a reward function of yours.

Each input row has `prompt` (a string: one user turn; or a list of {role, content} messages) and,
optionally, `ground_truth` (string; what the reward function compares with). Every output row gets the
data source given on the command line: verl hands it to the reward function, which can dispatch on it
(`launch/rewards.py` does). Splits come from the file names, as for math-lighteval.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converters.data.math_lighteval import DataError, find_inputs, print_counts, read_rows, write_splits


@dataclass
class PromptsReport:
    rows: int = 0


def _messages(prompt: Any, where: str) -> list[dict[str, str]]:
    if isinstance(prompt, str) and prompt.strip():
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                   and isinstance(m.get("content"), str) for m in prompt):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise DataError(f"{where}: `prompt` must be a non-empty string or a list of {{role, content}} messages, got {type(prompt).__name__}")


def to_verl_row(row: dict[str, Any], data_source: str, ability: str, split: str, index: int, where: str) -> dict[str, Any]:
    if "prompt" not in row:
        raise DataError(f"{where}: no `prompt` column (has {', '.join(sorted(row)) or 'nothing'})")
    truth = row.get("ground_truth", "")
    return {
        "data_source": data_source,
        "prompt": _messages(row["prompt"], where),
        "ability": ability,
        "reward_model": {"style": "rule", "ground_truth": "" if truth is None else str(truth)},
        "extra_info": {"split": split, "index": index},
    }


def convert(src: Path, dst: Path, data_source: str, ability: str = "custom") -> dict[str, PromptsReport]:
    """Write DST/<split>.parquet for every split found; nothing is written if any row is bad."""
    if not data_source.strip():
        raise DataError("--data-source must not be empty: the reward function dispatches on it")
    rows_by_split: dict[str, list[dict[str, Any]]] = {}
    for split, files in sorted(find_inputs(src).items()):
        rows = rows_by_split.setdefault(split, [])
        for file in files:
            for number, row in enumerate(read_rows(file)):
                rows.append(to_verl_row(row, data_source, ability, split, len(rows), f"{file}: row {number}"))
        if not rows:
            raise DataError(f"{', '.join(map(str, files))}: no rows for split {split}")
    write_splits(dst, rows_by_split)
    return {split: PromptsReport(len(rows)) for split, rows in rows_by_split.items()}


def prompts_command(src: Path, dst: Path, data_source: str, ability: str, as_json: bool) -> int:
    print_counts(convert(src, dst, data_source, ability), as_json,
                 lambda split, report: f"{split}: {report.rows} rows written to {dst / (split + '.parquet')} (data_source {data_source})")
    return 0
