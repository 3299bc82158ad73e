"""`launch`: the command line for planning, checking, running and reporting GRPO runs, and the demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from patcher import __version__

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
    plan.add_argument("--model", required=True, help="HF model dir (config.json) or a preset: deepseek-v3, deepseek-r1, deepseek-v3-0324")
    plan.add_argument("--nodes", type=int, required=True)
    plan.add_argument("--gpus-per-node", type=int, default=8)
    plan.add_argument("--gpu-mem-gb", type=float, default=80, help="80 (H100/A100), 96 (H20), 141 (H200)")
    plan.add_argument("--recipe", help="pai-16x8, verl-h20-12, verl-h20-16, verl-h20-32, verl-h20-64")
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
    grpo.add_argument("--mcore-ckpt", type=Path, required=True, help="convert hf-mcore output (or its release/)")
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
    grpo.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from launch.demo import DemoFailure, format_table, run_demo

        try:
            results = run_demo(args.out)
        except DemoFailure as exc:
            print(f"launch demo: FAILED: {exc}", file=sys.stderr)
            return 1
        print("\n" + format_table(results))
        return 0
    if args.command == "plan":
        return run_plan(args)
    if args.command == "grpo":
        return run_grpo(args)
    if args.command == "report":
        return run_report(args)
    if args.command == "doctor":
        from launch.doctor import print_report, report

        data = report()
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            print_report(data)
        return 0 if data["megatron_patch"]["state"] in ("applied", "not-needed") else 1
    return 2


def run_grpo(args: argparse.Namespace) -> int:
    import os

    from launch.grpo import dry_run_json, prepare, print_dry_run
    from launch.plan import PlanError, make_plan

    try:
        plan, config = make_plan(str(args.model), args.nodes, args.gpus_per_node, args.gpu_mem_gb, args.recipe)
    except PlanError as exc:
        print(f"launch grpo: error: {exc}", file=sys.stderr)
        return 2
    report = prepare(plan, config, args.model.resolve(), args.mcore_ckpt.resolve(), args.data.resolve(), args.set, os.environ)
    if args.dry_run:
        if args.json:
            print(dry_run_json(report))
        else:
            print_dry_run(report)
        return 0 if report["ok"] else 1
    if args.ray_address:
        return run_submit(args, report)
    return run_cluster(args, plan, report)


def new_run_dir(args: argparse.Namespace) -> Path:
    import time

    run_dir = args.run_dir or Path("runs") / time.strftime("grpo-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def preflight_failed(report: dict) -> bool:
    failed = [f"{c['name']}: {c['message']}" for c in report["preflight"] if not c["ok"]]
    if failed:
        print("launch grpo: preflight failed, nothing started:\n  " + "\n  ".join(failed), file=sys.stderr)
    return bool(failed)


def trainer_command(args: argparse.Namespace, report: dict, run_dir: Path, python: str | None = None) -> list[str]:
    """verl's command for this run (with `python`, for another machine), recorded as RUN_DIR/command.json."""
    command = ([python] if python else report["command"][:1]) + report["command"][1:]
    if python is None:  # on this machine: hydra's outputs/<date>/<time> go into the run dir, not the current dir
        command.append(f"hydra.run.dir={(run_dir / 'hydra').resolve()}")
    command += ["--cfg", "job"] if args.print_config else []
    (run_dir / "command.json").write_text(json.dumps(command, indent=1))
    return command


def run_submit(args: argparse.Namespace, report: dict) -> int:
    from launch.cluster import ClusterError, submit_job
    from launch.grpo import NODE_ENVIRONMENT

    if preflight_failed(report):
        return 1
    run_dir = new_run_dir(args)
    command = trainer_command(args, report, run_dir, args.python)
    print(f"submitting verl to the Ray cluster at {args.ray_address} (log: {run_dir / 'train.log'})", flush=True)
    try:
        code = submit_job(args.ray_address, command, run_dir / "train.log", NODE_ENVIRONMENT)
    except ClusterError as exc:
        print(f"launch grpo: error: {exc}", file=sys.stderr)
        return 1
    print(f"verl exited with code {code}", flush=True)
    return code


def run_cluster(args: argparse.Namespace, plan, report: dict) -> int:
    import os

    from launch.cluster import (
        ClusterError,
        NodeSpec,
        is_loopback,
        run_on_cluster,
        start_node,
        stop_node,
        stop_on_sigterm,
        wait_for_nodes,
        wait_until_head_leaves,
    )
    from launch.grpo import NODE_ENVIRONMENT, cluster_from_env

    cluster = cluster_from_env(os.environ, nodes=plan.nodes, node_rank=args.node_rank, head=args.head)
    spec = NodeSpec(cluster.node_rank, plan.nodes, plan.gpus_per_node, cluster.head_address, args.ray_port,
                    args.dashboard_host, args.dashboard_port)
    if spec.rank == 0 and preflight_failed(report):
        return 1
    run_dir = new_run_dir(args)
    stop_on_sigterm()
    if spec.rank == 0 and spec.nodes > 1 and is_loopback(spec.head):
        print("launch grpo: note: a multi-node Ray cluster on loopback runs in Ray's cluster mode, which listens on "
              "every interface: run it inside a network namespace whose only interface is lo", file=sys.stderr)
    node = start_node(spec, NODE_ENVIRONMENT, run_dir / f"ray-node{spec.rank}.log")
    try:
        if spec.rank != 0:
            print(f"node {spec.rank}: joined the Ray head at {spec.address}; waiting for it to finish", flush=True)
            code = wait_until_head_leaves(node)
            print(f"node {spec.rank}: the head went away (ray exited {code})", flush=True)
            return 0
        try:
            joined = wait_for_nodes(spec, args.join_timeout)
        except ClusterError as exc:
            print(f"launch grpo: error: {exc}", file=sys.stderr)
            return 1
        print(f"all {len(joined)} nodes joined with {sum(joined.values()):.0f} GPUs; starting verl (log: {run_dir / 'train.log'})", flush=True)
        command = trainer_command(args, report, run_dir)
        code = run_on_cluster(command, run_dir / "train.log", NODE_ENVIRONMENT, spec)
        print(f"verl exited with code {code}", flush=True)
        return code
    except KeyboardInterrupt:
        print("launch grpo: interrupted; stopping the Ray processes this command started", file=sys.stderr)
        return 130
    finally:
        stop_node(node)


def run_report(args: argparse.Namespace) -> int:
    from launch.report import ReportError, make_report, print_summary

    try:
        report = make_report(args.run, args.out)
    except ReportError as exc:
        print(f"launch report: error: {exc}", file=sys.stderr)
        return 2 if not args.run.exists() else 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_summary(report)
    return 0


def run_plan(args: argparse.Namespace) -> int:
    import json

    from launch.plan import PlanError, make_plan, plan_report

    try:
        plan, config = make_plan(args.model, args.nodes, args.gpus_per_node, args.gpu_mem_gb, args.recipe)
    except PlanError as exc:
        print(f"launch plan: error: {exc}", file=sys.stderr)
        return 2
    report = plan_report(plan, config)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    memory = report["memory_gb"]
    print(f"{plan.nodes} nodes x {plan.gpus_per_node} GPUs ({plan.gpu_mem_gb:.0f} GB){' — recipe ' + plan.recipe if plan.recipe else ''}")
    print(f"  training: TP={plan.tp} PP={plan.pp} EP={plan.ep} ETP={plan.etp} CP={plan.cp} DP={plan.dp}"
          f"  first/last stage layers: {plan.first_stage_layers}/{plan.last_stage_layers}")
    print(f"  rollout:  vLLM TP={plan.rollout_tp}, {plan.vllm_engines} engines, gpu_memory_utilization {plan.gpu_memory_utilization}")
    print(f"  offload:  param={plan.param_offload} grad={plan.grad_offload} optimizer={plan.optimizer_offload}"
          + (f" (fraction {plan.optimizer_offload_fraction})" if plan.optimizer_offload_fraction else ""))
    print(f"  checkpoint layout: convert hf-mcore ... --align-tp {plan.tp} --align-etp {plan.etp}"
          + (f" (or --recipe {plan.recipe})" if plan.recipe else "") + ": each rank then reads only its own slices")
    print("  memory per GPU (GB): " + ", ".join(f"{k} {v}" for k, v in memory.items() if isinstance(v, float)))
    for line in memory["reasoning"]:
        print(f"    - {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
