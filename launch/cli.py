"""`launch`: the command line for planning, checking, running and reporting GRPO runs, and the demo.

It only parses arguments; each command is a function of its step module (plan, grpo, report, doctor, demo).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from toolkit.presets import PRESETS
from toolkit.recipes import RECIPES
from toolkit.version import __version__

DESCRIPTION = "Plan, check and run verl GRPO for DeepSeek-V3-class models, and plot its metrics; `launch demo` runs the toolkit end to end."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="run the pipeline on generated inputs and print a table of steps, times and checks",
        description="Run every step of the toolkit on generated inputs (nothing is downloaded). "
        "The installed megatron-core is never modified: a scratch copy is patched.",
    )
    demo.add_argument("--out", type=Path, default=Path("demo-out"), help="scratch directory (default: demo-out)")
    plan = commands.add_parser(
        "plan",
        help="parallelism plan (TP/PP/EP/ETP, stage layers, rollout TP) with a per-GPU memory estimate",
        description="Plan Megatron training and vLLM rollout for GRPO. Named recipes reproduce known-good plans "
        "exactly; without one, the smallest valid layout that fits is chosen, or the request is refused with the "
        "smallest node count that would work.",
        epilog="exit codes:\n  0  a plan\n  2  impossible request (the message names the smallest feasible cluster)\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plan.add_argument("--model", required=True, help="HF model dir (config.json) or a preset (the published config.json): " + ", ".join(PRESETS))
    plan.add_argument("--nodes", type=int, required=True)
    plan.add_argument("--gpus-per-node", type=int, default=8)
    plan.add_argument("--gpu-mem-gb", type=float, default=80, help="80 (H100/A100), 96 (H20), 141 (H200)")
    plan.add_argument("--recipe", help="a known-good plan: " + ", ".join(f"{name} ({plan.model})" for name, plan in RECIPES.items()))
    plan.add_argument("--json", action="store_true")
    report = commands.add_parser(
        "report",
        help="a run's verl metrics to CSV and PNG plots (reward, validation accuracy, response length, KL, entropy)",
        description="Read verl's console step lines (`step:N - key:value - ...`) from a run's log and write "
        "metrics.csv (one row per step, one column per metric) and PNG plots against step: reward, validation "
        "accuracy, response length, KL, entropy, and overview.png with all of them.",
        epilog="exit codes:\n  0  report written\n  1  no step lines in the log\n  2  no such run dir or log\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("run", type=Path, metavar="RUN_DIR", help="a `launch grpo` run dir (its train.log) or a log file")
    report.add_argument("--out", type=Path, help="where to write (default RUN_DIR/report)")
    report.add_argument("--json", action="store_true", help="print the summary as JSON")
    doctor = commands.add_parser("doctor", help="installed versions against the tested matrix, and the Megatron patch status")
    doctor.add_argument("--json", action="store_true")
    grpo = commands.add_parser(
        "grpo",
        help="verl GRPO on Megatron + vLLM: plan, overrides for the installed verl, preflight (--dry-run)",
        description="Build the verl GRPO command for a plan (overrides in the installed verl's dialect, the dist "
        "checkpoint for actor and ref, nodes, data) and check everything that can be checked before a GPU is "
        "touched: verl's own config composed with every override and validated, the HF config and Megatron "
        "patches, the dist checkpoint against the model, the data schema. Then rank 0 starts the Ray head "
        "(loopback-only dashboard unless --dashboard-host), waits for every node, runs verl with the log teed "
        "into the run dir and returns its exit code; other ranks join and leave when the head goes away. "
        "Only the Ray processes this command started are stopped.",
        epilog="exit codes:\n  0  preflight passed (--dry-run)\n  1  a preflight check failed (each says what to do), or the nodes did not all join\n"
        "  2  bad arguments or an impossible plan\n  N  without --dry-run: verl's own exit code (130 when interrupted)\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    grpo.add_argument("--nodes", type=int, required=True)
    grpo.add_argument("--model", type=Path, required=True, help="HF model dir (patched config.json, tokenizer)")
    grpo.add_argument("--mcore-ckpt", type=Path, required=True, help="convert hf-mcore output (or its release/), or a verl checkpoints dir or global_step_N to start from a trained actor")
    grpo.add_argument("--data", type=Path, required=True, help="dir with train.parquet and test.parquet")
    grpo.add_argument("--recipe", help="a named plan (see `launch plan --help`)")
    grpo.add_argument("--gpus-per-node", type=int, default=8)
    grpo.add_argument("--gpu-mem-gb", type=float, default=80)
    grpo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other verl override (repeatable; wins)")
    grpo.add_argument("--dry-run", action="store_true", help="print plan, environment, command and preflight; start nothing")
    grpo.add_argument("--node-rank", type=int, help="this node's rank (default: from PAI-DLC/MLP/Slurm/torchrun variables, else 0)")
    grpo.add_argument("--head", help="head node address (default: from the environment, else 127.0.0.1)")
    grpo.add_argument("--ray-port", type=int, default=6379)
    grpo.add_argument("--ray-address", metavar="URL",
                      help="submit to an existing Ray cluster's job API (e.g. http://head:8265) with `ray job submit` "
                      "instead of starting one; run on one machine only")
    grpo.add_argument("--python", default="python3", help="with --ray-address: the Python that runs verl on the head (default python3)")
    grpo.add_argument("--dashboard-host", default="127.0.0.1", help="where Ray's dashboard/job API listen (default loopback only)")
    grpo.add_argument("--dashboard-port", type=int, default=8265, help="port of the head's dashboard and job API (default 8265)")
    grpo.add_argument("--join-timeout", type=float, default=600, help="seconds the head waits for every node (default 600)")
    grpo.add_argument("--run-dir", type=Path, help="logs go here (default runs/grpo-<time>)")
    grpo.add_argument("--print-config", action="store_true", help="run verl in config-print mode (--cfg job) instead of training")
    saving = grpo.add_argument_group("checkpoints and resume", "verl saves the actor (weights as a Megatron dist checkpoint, fp32 "
                                     "optimizer state, RNG) and the data position every N steps; the same command resumes "
                                     "from the latest complete one (stop with SIGTERM or Ctrl-C at any time)")
    saving.add_argument("--save-every", type=int, default=20, metavar="N", help="save every N steps and at the last step (default 20; 0: never)")
    saving.add_argument("--ckpt-dir", type=Path, help="where checkpoints go (default RUN_DIR/checkpoints; give --run-dir to resume)")
    saving.add_argument("--keep-ckpts", type=int, default=2, metavar="K", help="keep the last K checkpoints of this process (default 2; 0: all)")
    saving.add_argument("--resume", default="auto", metavar="auto|never|DIR",
                        help="auto (default): from the latest checkpoint in --ckpt-dir if any; never: start over; "
                        "or a global_step_N dir")
    grpo.add_argument("--reward-fn", metavar="FILE[:NAME]",
                      help="a Python file whose function NAME (default compute_score) verl calls as "
                      "fn(data_source, solution_str, ground_truth, extra_info); default: verl's own scorers "
                      "(MATH-lighteval and others). launch/rewards.py adds the toolkit's digit-share smoke task")
    grpo.add_argument("--test-every", type=int, default=10, metavar="N", help="validate every N steps (default 10; -1: only before training)")
    grpo.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from launch.demo import demo_command

        return demo_command(args.out)
    if args.command == "plan":
        from launch.plan import plan_command

        return plan_command(args.model, args.nodes, args.gpus_per_node, args.gpu_mem_gb, args.recipe, args.json)
    if args.command == "grpo":
        from launch.grpo import GrpoOptions, grpo_command

        return grpo_command(GrpoOptions(
            nodes=args.nodes, model=args.model, mcore_ckpt=args.mcore_ckpt, data=args.data, recipe=args.recipe,
            gpus_per_node=args.gpus_per_node, gpu_mem_gb=args.gpu_mem_gb, sets=args.set, dry_run=args.dry_run,
            node_rank=args.node_rank, head=args.head, ray_port=args.ray_port, ray_address=args.ray_address,
            python=args.python, dashboard_host=args.dashboard_host, dashboard_port=args.dashboard_port,
            join_timeout=args.join_timeout, run_dir=args.run_dir, print_config=args.print_config, as_json=args.json,
            save_every=args.save_every, ckpt_dir=args.ckpt_dir, keep_ckpts=args.keep_ckpts or None, resume=args.resume,
            reward_fn=args.reward_fn, test_every=args.test_every,
        ))
    if args.command == "report":
        from launch.report import report_command

        return report_command(args.run, args.out, args.json)
    if args.command == "doctor":
        from launch.doctor import doctor_command

        return doctor_command(args.json)
    return 2


if __name__ == "__main__":
    sys.exit(main())
