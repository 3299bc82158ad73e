"""vLLM serves our FP8 export, and how far its log-probabilities are from the BF16 model's (GPU machine).

    python -m bench.fp8_serve run --model HF_DIR --out FILE.json     one vLLM engine: greedy generation and the
                                                                      prompt's log-probabilities (offline, eager)
    python -m bench.fp8_serve compare --fp8 A.json --bf16 B.json     per-token log-probability differences

The prompts are the smoke task's, long enough for a few hundred prompt positions; the prompt tokens are the
same for both models, so each position's log-probability of the actual next token is compared directly.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

PROMPTS = [
    "Reply with a number: the sum of the digits in the answer is what number, write digits only",
    "Write digits only: find value of the number that is the answer to the sum of a digit and a number",
    "what is the sum, reply with only the digit of the answer, a number of the digit with the sum",
    "the answer is a number: write the digit, reply with what the value of the sum is, digits only",
]


def run(model: Path) -> dict:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
               for text in PROMPTS]
    llm = LLM(model=str(model), enforce_eager=True, gpu_memory_utilization=0.3, max_model_len=512, seed=0)
    quantization = getattr(llm.llm_engine.model_config, "quantization", None)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, logprobs=1, prompt_logprobs=1))
    rows = []
    for output in outputs:
        ids = list(output.prompt_token_ids)
        # position k (k >= 1): log p(token k | tokens < k); vLLM gives None for the first
        prompt = [entry[ids[k]].logprob for k, entry in enumerate(output.prompt_logprobs) if entry is not None]
        generated = output.outputs[0]
        rows.append({"prompt_ids": ids, "prompt_logprobs": prompt, "generated_ids": list(generated.token_ids),
                     "generated_logprobs": [entry[token].logprob for token, entry in zip(generated.token_ids, generated.logprobs, strict=True)],
                     "text": generated.text})
    return {"model": str(model), "quantization": quantization, "rows": rows}


def compare(fp8: dict, bf16: dict) -> dict:
    diffs, same_prefix, total = [], 0, 0
    for a, b in zip(fp8["rows"], bf16["rows"], strict=True):
        assert a["prompt_ids"] == b["prompt_ids"], "the two runs tokenised the prompts differently"
        diffs += [abs(x - y) for x, y in zip(a["prompt_logprobs"], b["prompt_logprobs"], strict=True)]
        agree = 0
        for x, y in zip(a["generated_ids"], b["generated_ids"], strict=False):
            if x != y:
                break
            agree += 1
        same_prefix += agree
        total += len(b["generated_ids"])
    return {
        "quantization": [fp8["quantization"], bf16["quantization"]],
        "prompt_positions": len(diffs),
        "logprob_abs_diff": {"max": max(diffs), "mean": statistics.fmean(diffs), "median": statistics.median(diffs)},
        "greedy_tokens_identical_before_first_divergence": f"{same_prefix} of {total}",
        "texts": {"fp8": [row["text"] for row in fp8["rows"]], "bf16": [row["text"] for row in bf16["rows"]]},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fp8_serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("run")
    one.add_argument("--model", type=Path, required=True)
    one.add_argument("--out", type=Path, required=True)
    both = commands.add_parser("compare")
    both.add_argument("--fp8", type=Path, required=True)
    both.add_argument("--bf16", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "run":
        result = run(args.model)
        args.out.write_text(json.dumps(result) + "\n")
        print(json.dumps({"model": result["model"], "quantization": result["quantization"], "texts": [r["text"] for r in result["rows"]]}))
    else:
        print(json.dumps(compare(json.loads(args.fp8.read_text()), json.loads(args.bf16.read_text())), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
