"""`convert`: command-line entry that parses arguments and calls the converters."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from converters.jobs.errors import EXIT_FAILED, as_convert_error, signals_raise
from toolkit.version import __version__

DESCRIPTION = "Convert DeepSeek-V3-class checkpoints and data for verl GRPO on Megatron-Core."

FP8_BF16_HELP = """\
Cast a DeepSeek-V3-style FP8 checkpoint (e4m3 weights with 128x128 float32 *_scale_inv) to BF16.

Output: the same shard names, every tensor but the *_scale_inv (non-FP8 tensors byte-identical,
e_score_correction_bias stays float32), safetensors metadata {"format": "pt"}, an index with the
right total_size, config.json without quantization_config and with dtype bfloat16, and every other
file (tokenizer, *.py, generation_config.json, license) copied.

Safe to re-run: shards are written to DST/.fp8-bf16/ and renamed when complete; after a kill the
same command skips finished shards and the result is byte-identical. The index is written last.
"""

BF16_FP8_HELP = """\
Quantise a BF16 HF checkpoint of a DeepSeek-V3-class model (fp8-bf16's output, verl's merger output, an
mcore-hf export) to DeepSeek's FP8 release format, the one vLLM and SGLang serve: e4m3 weights with a
float32 *_scale_inv per 128x128 block (scale = block amax / 448, rounded to nearest even), and
config.json with the release's quantization_config.

Quantised: the 2-D projections of attention and MLP (the MTP layer's too). As they were: norms, the
router gate, e_score_correction_bias (float32), embeddings, the head, the MTP eh_proj. --like
RELEASE_DIR takes that choice, the shard names and quantization_config from the release's own
files, and keeps the release's scale_inv for every block whose weights are unchanged: a checkpoint
that went FP8 -> fp8-bf16 -> bf16-fp8 is the release again, byte for byte in every tensor.

Safe to re-run: shards are written to DST/.bf16-fp8/ and renamed when complete; after a kill the
same command skips finished shards and the result is byte-identical. The index is written last.
"""

HF_MCORE_HELP = """\
Write a Megatron-Core torch_dist checkpoint (the format verl loads with use_dist_checkpointing)
straight from a HF checkpoint, BF16 or FP8 (dequantised on the fly, same bits as fp8-bf16).

Every tensor is stored at its global shape, so the output loads at any TP/PP/EP/ETP; no GPU and
no model are needed, and memory stays near one --bin-mb file. The names follow the Transformer
Engine spec (--spec te, production) or the local spec. Give verl the printed release/ directory as
actor_rollout_ref.{actor,ref}.megatron.dist_checkpointing_path. Re-running resumes after a kill.
--align-tp/--align-etp (or --recipe) store each tensor as the slices the training plan's ranks ask
for, so that each rank reads only its own bytes at load.
"""


MCORE_HF_HELP = """\
Export a Megatron-Core torch_dist checkpoint of a DeepSeek-V3-class model to HF safetensors shards
with an index; config.json and tokenizer files come from --hf-config. Tensors keep their stored
dtype (BF16), or with --fp8 the projections are written in DeepSeek's FP8 release format, ready to
serve (as `convert bf16-fp8` would make of the BF16 export); memory stays near the largest tensor.

Safe to re-run: shards are written to DST/.mcore-hf/ and renamed when complete; after a kill the
same command skips finished shards and the result is byte-identical. The index is written last,
then .mcore-hf-source.json: a re-run on a finished export does nothing.
"""


def exit_codes(refused: str, part_done: str | None = None) -> str:
    """The exit-code table of a command's --help (README: "Exit codes")."""
    lines = ["exit codes:", "  0    done (or nothing to do: the output is already complete)"]
    if part_done:
        lines.append(f"  1    {part_done}")
    lines += [
        f"  2    {refused}; nothing written",
        "  3    reading or writing failed (disk full, permission); free space and re-run to resume",
        "  4    a worker process died (e.g. the out-of-memory killer), or an internal error; re-run to resume",
        "  130  interrupted by SIGINT (Ctrl-C), 143 by SIGTERM; re-run to resume",
    ]
    return "\n".join(lines) + "\n"


PARTS_EXIT_CODES = exit_codes("bad input or unsafe request (also: this part is already being written)",
                              "this --shard part is done, other parts are still missing (index not yet written)")


def _shard_spec(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected I/N such as 0/4, got {text!r}") from exc
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"need 0 <= I < N, got {text!r}")
    return index, count


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _paths(command: argparse.ArgumentParser, src_help: str, dst_help: str) -> None:
    command.add_argument("--src", type=Path, required=True, help=src_help)
    command.add_argument("--dst", type=Path, required=True, help=dst_help)


def _write_limit(command: argparse.ArgumentParser) -> None:
    command.add_argument("--max-write-mbps", type=float, default=None, metavar="MB/s",
                         help="limit the write rate, shared by the --workers (shared filesystems)")


def _job_fields(args: argparse.Namespace) -> dict:
    """The JobOptions every long conversion takes, from its flags."""
    return {"device": args.device, "workers": args.workers, "shard_index": args.shard[0], "shard_count": args.shard[1],
            "overwrite": args.overwrite, "max_write_bytes_per_s": args.max_write_mbps * 1e6 if args.max_write_mbps else None}


def _data_command(commands, name: str, help_text: str, description: str, refused: str, example: str,
                  src_help: str, dst_help: str) -> argparse.ArgumentParser:
    """A data command's parser: description, exit codes and example, --src/--dst and --json."""
    command = commands.add_parser(name, help=help_text, description=description,
                                  epilog=exit_codes(refused) + f"\nexample:\n  {example}\n", formatter_class=argparse.RawDescriptionHelpFormatter)
    _paths(command, src_help, dst_help)
    command.add_argument("--json", action="store_true", help="print the counts as JSON")
    return command


def _output_flags(command: argparse.ArgumentParser, overwrite_help: str = "write into a non-empty DST that holds something else") -> None:
    command.add_argument("--overwrite", action="store_true", help=overwrite_help)
    command.add_argument("--json", action="store_true", help="print the summary as JSON")
    command.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cast = commands.add_parser(
        "fp8-bf16",
        help="FP8 block-quantised checkpoint -> BF16 safetensors (exact, resumable)",
        description=FP8_BF16_HELP,
        epilog=PARTS_EXIT_CODES + "\nexample:\n  convert fp8-bf16 --src /models/DeepSeek-V3-0324 --dst /models/DeepSeek-V3-0324-BF16\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _paths(cast, "HF dir with model.safetensors.index.json (or model.safetensors)",
           "output dir: new, empty, or an interrupted run of the same command")
    cast.add_argument("--drop-mtp", action="store_true", help="drop MTP layers (index >= num_hidden_layers), set num_nextn_predict_layers 0")
    cast.add_argument("--device", default="auto", help="auto (CUDA if visible), cuda, cuda:N or cpu")
    cast.add_argument("--workers", type=_positive, default=1, help="processes: one per GPU, or CPU workers (default 1)")
    cast.add_argument("--shard", type=_shard_spec, default=(0, 1), metavar="I/N", help="convert part I of N (machines sharing a filesystem)")
    cast.add_argument("--verify", action="store_true", help="re-read the output and check sampled blocks against the source")
    cast.add_argument("--batch-mb", type=_positive, default=512, help="FP8 bytes dequantised per batch (default 512)")
    _write_limit(cast)
    _output_flags(cast)
    quant = commands.add_parser(
        "bf16-fp8",
        help="BF16 HF checkpoint -> DeepSeek's FP8 release format (e4m3 + 128x128 scale_inv), for serving",
        description=BF16_FP8_HELP,
        epilog=PARTS_EXIT_CODES.replace("; nothing written", "; nothing written (but a NaN or Inf in a weight is met while "
                                        "quantising: the run stops there; fix the tensor, then run again with --overwrite)")
        + "\nexamples:\n  convert bf16-fp8 --src step100-hf --dst step100-fp8\n"
        "  convert bf16-fp8 --src step100-hf --dst step100-fp8 --like /models/DeepSeek-V3-0324\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _paths(quant, "HF dir of BF16 safetensors with config.json (DeepSeek-V3/R1, Kimi-K2, Moonlight, V2-Lite)",
           "output dir: new, empty, or an interrupted run of the same command")
    quant.add_argument("--like", type=Path, default=None, metavar="RELEASE_DIR",
                       help="the FP8 release the model came from: its choice of tensors, shard names, quantization_config, "
                       "and its scales where the weights are unchanged (only its index, headers and scales are read)")
    quant.add_argument("--drop-mtp", action="store_true", help="leave the MTP layers out, set num_nextn_predict_layers 0")
    quant.add_argument("--device", default="auto", help="auto (CUDA if visible), cuda, cuda:N or cpu (same bits on each)")
    quant.add_argument("--workers", type=_positive, default=1, help="processes: one per GPU, or CPU workers (default 1)")
    quant.add_argument("--shard", type=_shard_spec, default=(0, 1), metavar="I/N", help="convert part I of N (machines sharing a filesystem)")
    quant.add_argument("--batch-mb", type=_positive, default=512, help="BF16 bytes quantised per batch (default 512)")
    _write_limit(quant)
    _output_flags(quant)
    mcore = commands.add_parser(
        "hf-mcore",
        help="HF checkpoint (BF16 or FP8) -> Megatron-Core torch_dist checkpoint, one process, bounded memory",
        description=HF_MCORE_HELP,
        epilog=PARTS_EXIT_CODES.replace("this --shard part", "this --shard part of the bins")
        + "\nexample:\n  convert hf-mcore --src /models/DeepSeek-V3-0324 --dst /models/DeepSeek-V3-0324-mcore\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _paths(mcore, "HF dir: DeepSeek-V3/R1, Kimi-K2, Moonlight, V2-Lite; BF16 or FP8",
           "output dir (gets latest_checkpointed_iteration.txt and release/)")
    mcore.add_argument("--spec", choices=["te", "local"], default="te", help="Megatron layer spec the names are for (default te)")
    mcore.add_argument("--drop-mtp", action="store_true", help="leave the MTP layers out")
    mcore.add_argument("--device", default="cpu", help="where FP8 weights are dequantised: cpu (default), cuda, auto")
    mcore.add_argument("--workers", type=_positive, default=1, help="processes writing bins in parallel")
    mcore.add_argument("--readers", type=_positive, default=None,
                       help="threads reading and dequantising ahead of the writer, per process "
                       "(default: 1 with --device cuda, else a quarter of the CPU cores, at most 4)")
    mcore.add_argument("--shard", type=_shard_spec, default=(0, 1), metavar="I/N", help="write part I of N of the bins")
    mcore.add_argument("--bin-mb", type=_positive, default=512, help="size of each .distcp file, bounds memory (default 512)")
    _write_limit(mcore)
    layout = mcore.add_argument_group(
        "layout for a training plan",
        "Cut every tensor into the slices a Megatron rank asks for at load, so that each rank reads only its own "
        "bytes (torch DCP reads every overlapping stored chunk whole). The result still loads at any TP/PP/EP.",
    )
    layout.add_argument("--align-tp", type=_positive, default=None, metavar="N", help="the training TP (as `launch plan` prints it)")
    layout.add_argument("--align-etp", type=_positive, default=None, metavar="M",
                        help="the training expert TP (default: --align-tp, Megatron's default)")
    layout.add_argument("--recipe", default=None, help="take TP/ETP from a `launch plan` recipe (pai-16x8, verl-h20-16, ...)")
    _output_flags(mcore)
    export = commands.add_parser(
        "mcore-hf",
        help="Megatron-Core torch_dist checkpoint (ours or verl's actor) -> HF safetensors",
        description=MCORE_HF_HELP,
        epilog=exit_codes("bad input (the message names the file and tensor) or unsafe request (also: DST is "
                          "already being written)") + "\nexample:\n"
        "  convert mcore-hf --src ckpt/global_step_100/actor --hf-config /models/DeepSeek-V3-0324 --dst /models/step100-hf\n"
        "  convert mcore-hf --src runs/grpo/checkpoints --hf-config model/ --dst step-latest-hf   (the latest saved step)\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("--src", type=Path, required=True,
                        help="a torch_dist dir (.metadata), our hf-mcore output, verl's checkpoints dir (the latest step "
                        "by latest_checkpointed_iteration.txt), or one of its global_step_N or global_step_N/actor dirs")
    export.add_argument("--hf-config", type=Path, required=True, help="HF dir whose config.json and tokenizer describe the model")
    export.add_argument("--dst", type=Path, required=True, help="output dir: new, empty, or an interrupted export of the same command")
    export.add_argument("--workers", type=_positive, default=1, help="processes writing shards in parallel")
    export.add_argument("--fp8", action="store_true",
                        help="write DeepSeek's FP8 release format, the one vLLM and SGLang serve (see `convert bf16-fp8 --help`)")
    export.add_argument("--like", type=Path, default=None, metavar="RELEASE_DIR",
                        help="with --fp8: the release the model came from (its choice of tensors, shard names, quantization_config; "
                        "its scales where the weights are unchanged)")
    export.add_argument("--device", default="cpu", help="where --fp8 quantises: cpu (default), cuda, cuda:N, auto (same bits on each)")
    _output_flags(export)
    data = _data_command(
        commands, "math-lighteval",
        "MATH-lighteval (parquet, JSON/JSONL, saved datasets dir) -> verl train.parquet / test.parquet",
        "Prepare MATH-lighteval for verl GRPO: each row becomes a chat prompt asking for a boxed "
        "answer, with the last \\boxed{...} of the reference solution as the rule-based ground truth. "
        "Splits come from the file names (train, test). Rows whose solution has no usable box are skipped "
        "and counted (--strict: an error).",
        "unreadable input, a row without problem/solution, or (--strict) a row without a box",
        "convert math-lighteval --src dataset/MATH-lighteval --dst data/math",
        "a file, a dir of split files, or a datasets.save_to_disk dir", "output dir for train.parquet and test.parquet",
    )
    data.add_argument("--strict", action="store_true", help="a row without a boxed answer is an error")
    prompts = _data_command(
        commands, "prompts",
        "your own prompts (JSONL/JSON/parquet: prompt, ground_truth) -> verl train.parquet / test.parquet",
        "Prepare prompts for verl GRPO with a reward function of your own: each row's `prompt` (a "
        "string, or a list of {role, content} messages) becomes the chat prompt, `ground_truth` (optional) the "
        "reward model's ground truth, and every row gets --data-source, on which the reward function dispatches. "
        "Splits come from the file names (train, test); a single file is the train split.",
        "unreadable input or a row without a usable prompt (the message names file and row)",
        "convert prompts --src task.jsonl --dst data/task --data-source dsv3-toolkit/digit-share",
        "a file, or a dir of split files (train*.jsonl, test*.jsonl, ...)", "output dir for <split>.parquet",
    )
    prompts.add_argument("--data-source", required=True, help="the data_source column (the reward function dispatches on it)")
    prompts.add_argument("--ability", default="custom", help="the ability column (default custom)")
    commands.add_parser(  # listed here; `convert check ...` is handed whole to converters.mcore.check (its own --help)
        "check", add_help=False,
        help="load a Megatron-Core checkpoint into the model verl builds (TE on GPUs, or CPU) and compare logits with transformers",
    )
    return parser


def run_fp8_bf16(args: argparse.Namespace) -> int:
    from converters.fp8.cast import cast_command
    from converters.fp8.plan import CastOptions

    options = CastOptions(
        drop_mtp=args.drop_mtp,
        batch_bytes=args.batch_mb * 1024 * 1024,
        **_job_fields(args),
    )
    return cast_command(args.src, args.dst, options, verify=args.verify, as_json=args.json, quiet=args.quiet)


def run_bf16_fp8(args: argparse.Namespace) -> int:
    from converters.fp8.cast import run_command
    from converters.fp8.quant_plan import QuantOptions, plan_quantise

    options = QuantOptions(like=args.like, drop_mtp=args.drop_mtp, batch_bytes=args.batch_mb * 1024 * 1024, **_job_fields(args))
    return run_command(plan_quantise(args.src, args.dst, options), verify=False, as_json=args.json, quiet=args.quiet)


def _alignment(args: argparse.Namespace) -> tuple[int | None, int | None]:
    """(TP, ETP) from --align-tp/--align-etp or --recipe; raises ValueError for people."""
    if args.recipe is None:
        return args.align_tp, args.align_etp
    if args.align_tp is not None or args.align_etp is not None:
        raise ValueError("give either --recipe or --align-tp/--align-etp, not both")
    from toolkit.recipes import RECIPES

    if args.recipe not in RECIPES:
        raise ValueError(f"unknown recipe {args.recipe!r}; known: {', '.join(RECIPES)}")
    return RECIPES[args.recipe].tp, RECIPES[args.recipe].etp


def run_hf_mcore(args: argparse.Namespace) -> int:
    from converters.mcore.from_hf import McoreOptions, mcore_command

    try:
        align_tp, align_etp = _alignment(args)
    except ValueError as exc:
        print(f"convert hf-mcore: error: {exc}", file=sys.stderr)
        return 2
    options = McoreOptions(
        spec=args.spec,
        drop_mtp=args.drop_mtp,
        readers=args.readers,
        bin_bytes=args.bin_mb * 1024 * 1024,
        align_tp=align_tp,
        align_etp=align_etp,
        **_job_fields(args),
    )
    return mcore_command(args.src, args.dst, options, as_json=args.json, quiet=args.quiet)


def run_mcore_hf(args: argparse.Namespace) -> int:
    from converters.mcore.to_hf import ExportOptions, export_command

    if args.like is not None and not args.fp8:
        print("convert mcore-hf: error: --like is for --fp8 (the release whose FP8 layout to write)", file=sys.stderr)
        return 2
    options = ExportOptions(workers=args.workers, overwrite=args.overwrite, device=args.device, fp8=args.fp8, like=args.like)
    return export_command(args.src, args.hf_config, args.dst, options, as_json=args.json, quiet=args.quiet)


def run_math_lighteval(args: argparse.Namespace) -> int:
    from converters.data.math_lighteval import lighteval_command

    return lighteval_command(args.src, args.dst, args.strict, as_json=args.json)


def run_prompts(args: argparse.Namespace) -> int:
    from converters.data.prompts import prompts_command

    return prompts_command(args.src, args.dst, args.data_source, args.ability, as_json=args.json)


COMMANDS = {"fp8-bf16": run_fp8_bf16, "bf16-fp8": run_bf16_fp8, "hf-mcore": run_hf_mcore, "mcore-hf": run_mcore_hf, "math-lighteval": run_math_lighteval,
            "prompts": run_prompts}


def main(argv: list[str] | None = None) -> int:
    """Run one command; every expected failure becomes one line on stderr and its exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check"]:
        from converters.mcore.check import main as check_main

        return check_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        with signals_raise():
            return COMMANDS[args.command](args)
    except BaseException as exc:  # SystemExit and bugs go on below; the rest is mapped here, once
        error = as_convert_error(exc)
        if error is not None:
            print(f"convert {args.command}: error: {error}", file=sys.stderr)
            return error.exit_code
        if isinstance(exc, SystemExit):
            raise
        traceback.print_exc()
        print(f"convert {args.command}: internal error (a bug, please report it with the traceback above); "
              "finished files are kept, re-run to resume", file=sys.stderr)
        return EXIT_FAILED


def run() -> None:
    """The `convert` command: main()'s exit code, also after a failure with native threads still unwinding.

    After a failed write (disk full) a reader or torch thread can still be inside native code when the
    interpreter shuts down, and its C++ runtime then aborts the process (SIGABRT, seen under the
    disk-full test), turning exit 3 into -6. Files are already cleaned up by then: leave at once.
    """
    code = main()
    if code != 0:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
