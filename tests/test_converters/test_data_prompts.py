"""`convert prompts` and the GRPO smoke task's inputs: the tiny servable model's tokenizer and config."""

from __future__ import annotations

import json
import subprocess

import pytest
from convert_cli import convert as run_convert


def convert(*args: str) -> subprocess.CompletedProcess:
    return run_convert("prompts", *args, quiet=False)


def test_prompts_become_verl_rows_with_the_data_source(tmp_path):
    import pyarrow.parquet as pq

    src = tmp_path / "task"
    src.mkdir()
    (src / "train.jsonl").write_text(json.dumps({"prompt": "Reply with digits", "ground_truth": 7}) + "\n"
                                     + json.dumps({"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}) + "\n")
    (src / "test.jsonl").write_text(json.dumps({"prompt": "one more"}) + "\n")
    result = convert("--src", str(src), "--dst", str(tmp_path / "out"), "--data-source", "me/task", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"test": {"rows": 1}, "train": {"rows": 2}}
    rows = pq.read_table(tmp_path / "out" / "train.parquet").to_pylist()
    assert rows[0] == {"data_source": "me/task", "prompt": [{"role": "user", "content": "Reply with digits"}], "ability": "custom",
                       "reward_model": {"style": "rule", "ground_truth": "7"}, "extra_info": {"split": "train", "index": 0}}
    assert [m["role"] for m in rows[1]["prompt"]] == ["system", "user"] and rows[1]["reward_model"]["ground_truth"] == ""
    from launch.grpo import Preflight, _check_data

    preflight = Preflight()
    _check_data(preflight, tmp_path / "out")
    assert preflight.ok


@pytest.mark.parametrize("row, expected", [({"text": "x"}, "no `prompt` column (has text)"),
                                           ({"prompt": ""}, "must be a non-empty string"),
                                           ({"prompt": [{"role": "user"}]}, "must be a non-empty string or a list")])
def test_bad_rows_are_refused_naming_file_and_row(tmp_path, row, expected):
    src = tmp_path / "train.jsonl"
    src.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps(row) + "\n")
    result = convert("--src", str(src), "--dst", str(tmp_path / "out"), "--data-source", "x")
    assert result.returncode == 2 and expected in result.stderr and "train.jsonl: row 1" in result.stderr
    assert not (tmp_path / "out").exists()


def test_servable_model_has_a_real_tokenizer_and_the_release_config(tmp_path):
    """What vLLM, Megatron-Bridge and verl's DeepSeek prompt builder read: DeepSeek's special tokens, a chat
    template, generation_config.json, the release's config keys; few digit-only tokens (the smoke task starts low)."""
    from transformers import AutoTokenizer

    from converters.testing import (
        SERVABLE_DEEPSEEK_V3,
        deepseek_v3_config,
        digit_task_rows,
        make_servable_fp8_checkpoint,
    )

    config = make_servable_fp8_checkpoint(tmp_path)
    assert set(config) == set(deepseek_v3_config()) - {"auto_map"}
    assert config["kv_lora_rank"] + config["qk_rope_head_dim"] == 576  # vLLM's Hopper MLA backends
    assert config["num_experts_per_tok"] == 2 * config["topk_group"]  # megatron-core and vLLM rank groups alike
    assert config["rope_scaling"]["type"] == "yarn" and config["quantization_config"]["fmt"] == "e4m3"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tokenizer) == SERVABLE_DEEPSEEK_V3["vocab_size"] == config["vocab_size"]
    assert tokenizer.convert_tokens_to_ids("<\uff5cend\u2581of\u2581sentence\uff5c>") == tokenizer.eos_token_id == 1
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": digit_task_rows(1)[0]["prompt"]}], add_generation_prompt=True,
                                           tokenize=False)
    assert prompt.startswith("<\uff5cbegin\u2581of\u2581sentence\uff5c><\uff5cUser\uff5c>") and prompt.endswith("<\uff5cAssistant\uff5c>")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == prompt
    digits = sum(tokenizer.decode([i]).strip().isdigit() for i in range(len(tokenizer)))
    assert 0 < digits < len(tokenizer) * 0.15
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == 1
