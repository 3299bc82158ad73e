"""`launch grpo`: plan, overrides in the installed verl's dialect, and a preflight before any GPU is touched."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from launch.cluster import (
    ClusterError,
    NodeSpec,
    is_loopback,
    run_on_cluster,
    start_node,
    stop_node,
    stop_on_sigterm,
    submit_job,
    wait_for_nodes,
    wait_until_head_leaves,
)
from launch.overrides import (
    ROLES,
    RunSettings,
    build_overrides,
    command_line,
    dialect,
    installed_verl,
    stack_requirements,
    validate_with_verl,
)
from launch.plan import PlanError, count_params, make_plan, plan_report
from toolkit.recipes import Plan

NODE_ENVIRONMENT = {"CUDA_DEVICE_MAX_CONNECTIONS": "1", "NCCL_NVLS_ENABLE": "0", "VLLM_USE_V1": "1"}
# what one saved step holds per parameter: bf16 weights (model/dist_ckpt) + fp32 master, Adam m and v (optimizer/)
CKPT_BYTES_PER_PARAM = 2 + 4 + 4 + 4


@dataclass
class Cluster:
    node_rank: int
    nodes: int
    head_address: str
    source: str


def cluster_from_env(environ: Mapping[str, str], nodes: int | None = None, node_rank: int | None = None, head: str | None = None) -> Cluster:
    """Node rank, node count and head address: flags first, then PAI-DLC, MLP_*, Slurm, torchrun-style env."""
    sources = [
        ("PAI-DLC", "RANK", "WORLD_SIZE", "MASTER_ADDR"),
        ("MLP", "MLP_ROLE_INDEX", "MLP_WORKER_NUM", "MLP_WORKER_0_HOST"),
        ("Slurm", "SLURM_NODEID", "SLURM_NNODES", "SLURM_LAUNCH_NODE_IPADDR"),
        ("torchrun", "NODE_RANK", "NNODES", "MASTER_ADDR"),
    ]
    for name, rank_key, count_key, head_key in sources:
        if rank_key in environ and count_key in environ:
            return Cluster(
                node_rank if node_rank is not None else int(environ[rank_key]),
                nodes if nodes is not None else int(environ[count_key]),
                head or environ.get(head_key, "127.0.0.1"),
                name,
            )
    return Cluster(node_rank or 0, nodes or 1, head or "127.0.0.1", "flags")


@dataclass
class Check:
    name: str
    ok: bool
    message: str


@dataclass
class Preflight:
    checks: list[Check] = field(default_factory=list)

    def add(self, name: str, ok: bool, message: str) -> None:
        self.checks.append(Check(name, ok, message))

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)


def _check_model(preflight: Preflight, model: Path) -> None:
    from patcher.config_patch import HFConfigPatch

    status = HFConfigPatch(model / "config.json").detect() if (model / "config.json").is_file() else None
    if status is None:
        preflight.add("HF config", False, f"{model}/config.json not found")
    elif status.state == "needs-patch":
        preflight.add("HF config", False, f"{status.message}: run `patcher apply {model}`")
    else:
        preflight.add("HF config", status.state != "unsupported", status.message)


def check_group_routing(preflight: Preflight, config: dict) -> None:
    """megatron-core ranks expert groups by the sum of each group's top (top-k / topk_group) scores; DeepSeek's
    code, transformers and vLLM by the top 2. They agree only when top-k = 2 x topk_group (DeepSeek-V3: 8 = 2 x 4).
    Otherwise the Megatron actor and vLLM route tokens to different experts: a different model (measured on a
    tiny model with top-k 2 of 2 groups: 0.1 max |logit| difference against transformers, 6e-7 once 4 = 2 x 2)."""
    groups = config.get("n_group") or 1
    topk, group_topk = config.get("num_experts_per_tok"), config.get("topk_group") or 1
    if groups <= 1 or group_topk >= groups or not config.get("n_routed_experts"):
        return  # every group is kept (Kimi-K2, Moonlight, DeepSeek-V2-Lite: one group): how groups are scored does not matter
    ok = topk == 2 * group_topk
    preflight.add("MoE group routing", ok, f"top-{topk} experts from {group_topk} of {groups} groups"
                  + ("" if ok else f": megatron-core scores a group by its top {topk // group_topk} expert(s), vLLM and transformers "
                     "by its top 2, so training and rollout route differently; only num_experts_per_tok = 2 x topk_group agrees"))


def _check_hf_index(preflight: Preflight, model: Path, config: dict, from_dist_ckpt: bool) -> None:
    """The weight sync into vLLM takes the HF tensor names from model.safetensors.index.json (Megatron-Bridge
    reads names only, no tensor data, when the actor loads a dist checkpoint); a name missing there is
    skipped with a warning and vLLM keeps its dummy weights for it. Shards are needed only without one."""
    from converters.mcore.params import hf_tensor_shapes

    index = model / "model.safetensors.index.json"
    shards = sorted(model.glob("*.safetensors"))
    if not index.is_file():
        if from_dist_ckpt and not shards:
            preflight.add("HF tensor names", False, f"{index} missing: the weight sync into vLLM takes the tensor names from it; "
                          "copy the release's index (no shards needed)")
        return
    try:
        names = set(json.loads(index.read_text())["weight_map"])
        wanted = set(hf_tensor_shapes({**config, "num_nextn_predict_layers": 0}, 0))
    except (OSError, ValueError, KeyError) as exc:
        preflight.add("HF tensor names", False, f"{index}: unreadable ({exc})")
        return
    missing = sorted(wanted - names)
    if missing:
        preflight.add("HF tensor names", False, f"{index} lacks {len(missing)} tensor name(s) the model has, e.g. {missing[0]}: "
                      "vLLM would keep dummy weights for them after the sync; use the model's own index")
        return
    if not from_dist_ckpt and not shards:
        preflight.add("HF tensor names", False, f"{model}: no safetensors shards, and the actor does not load a dist checkpoint")
        return
    where = "the shards are not read (actor and ref load the dist checkpoint)" if from_dist_ckpt else \
        f"{len(shards)} safetensors shard(s) hold the weights"
    preflight.add("HF tensor names", True, f"{index}: all {len(wanted)} names; {where}")


def check_stack_settings(preflight: Preflight, verl_config: dict | None, environment: Mapping[str, str], requirements) -> None:
    """The settings this machine's stack needs are in the composed config of actor and ref (a --set can undo them)."""
    if verl_config is None:
        return
    transformers = [verl_config["actor_rollout_ref"][role]["megatron"].get("override_transformer_config") or {} for role in ROLES]
    problems, applied = [], []
    for need in requirements:
        ok = environment.get(need.key) == need.value if need.kind == "environment" else \
            all(str(transformer.get(need.key)) == need.value for transformer in transformers)
        (applied if ok else problems).append(f"{need.setting} ({need.reason})")
    message = "; ".join(problems) if problems else ("; ".join(applied) or "flash-attn, apex and flashinfer present: nothing to set")
    preflight.add("stack settings", not problems, ("needed but overridden: " if problems else "") + message)


def check_checkpoints(preflight: Preflight, config: dict, run: RunSettings) -> None:
    """Where checkpoints go, what one weighs (bf16 weights + fp32 Adam state), whether the disk holds it, and resume."""
    import shutil

    if run.save_every <= 0:
        preflight.add("checkpoints", True, "--save-every 0: this run saves nothing and cannot be resumed")
        return
    counts = count_params(config)
    size = (counts.dense + counts.experts) * CKPT_BYTES_PER_PARAM
    where = run.ckpt_dir
    existing = where
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    keep = run.keep
    fits = free // size if size else 0
    detail = (f"every {run.save_every} steps to {where}; one checkpoint ~{human_bytes(size)} "
              f"({human_count(counts.dense + counts.experts)} parameters x {CKPT_BYTES_PER_PARAM} bytes: bf16 weights + fp32 master, Adam m, v), "
              f"{human_bytes(free)} free there ({fits} fit)" + (f", keeping the last {keep}" if keep else ", keeping all"))
    if free < size:
        preflight.add("checkpoints", False, detail + ": not enough space for one; free space, choose --ckpt-dir elsewhere, or --save-every 0")
        return
    tracker = where / "latest_checkpointed_iteration.txt"
    if run.resume == "auto" and tracker.is_file():
        detail += f"; resumes from global_step_{tracker.read_text().strip()} (--resume never starts over)"
    elif run.resume not in ("auto", "never"):
        detail += f"; resumes from {run.resume}"
    preflight.add("checkpoints", free >= size * (keep or 1), detail + ("" if free >= size * (keep or 1) else f": {keep} do not fit"))


def _check_resume_path(preflight: Preflight, run: RunSettings) -> None:
    if run.resume in ("auto", "never"):
        return
    path = Path(run.resume)
    ok = path.name.startswith("global_step_") and (path / "actor").is_dir()
    preflight.add("resume", ok, f"{path}" + ("" if ok else ": not a verl global_step_N dir with actor/ (verl resumes from the global_step_N folder)"))


def _check_reward(preflight: Preflight, run: RunSettings) -> None:
    import ast

    if run.reward_path is None:
        return
    path = run.reward_path
    try:
        tree = ast.parse(path.read_text(), str(path))
    except (OSError, SyntaxError) as exc:
        preflight.add("reward function", False, f"{path}: {exc}")
        return
    names = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    ok = run.reward_name in names
    preflight.add("reward function", ok, f"{path}: {run.reward_name}" + (" defined" if ok else f" not defined (has {', '.join(sorted(names)) or 'no functions'})"))


def human_count(count: float) -> str:
    """671B, 5.54M, 900: parameter counts in the unit that keeps them readable."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g}{unit}"
    return f"{count:.0f}"


def human_bytes(size: float) -> str:
    """1.23 TB, 45.6 GB, 7.8 MB: the unit that keeps the number readable."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size:.0f} B"


def check_megatron(preflight: Preflight, plan: Plan, verl_config: dict | None, config: dict, megatron: Path | None = None) -> None:
    """Fail on a harmful Megatron state for this stack and model (config.json); demand only the patches they need.

    `megatron`: the tree the workers import (default: the megatron-core this Python imports)."""
    from converters.mcore.params import has_q_lora
    from patcher.stack import advise, installed_stack
    from patcher.states import PatchError
    from patcher.targets import resolve

    try:
        status = resolve(megatron).detect()
    except PatchError as exc:
        preflight.add("Megatron patch", False, str(exc))
        return
    if status.state == "unsupported":
        preflight.add("Megatron patch", False, f"megatron-core {status.version}: {status.message}")
        return
    advice = advise(installed_stack(status.version, verl_config), status.patches, tp=plan.tp, q_lora=has_q_lora(config))
    tree = status.path
    ok = not advice.harmful and not advice.needed
    action = f"; fix: `patcher apply {tree}`" if advice.needed else ""
    detail = f"megatron-core {status.version}, TP={plan.tp}, exporter {advice.exporter or 'unknown'}: " + " | ".join(advice.reasons)
    preflight.add("Megatron patch", ok, detail + action)


def dist_checkpoint(ckpt: Path):
    """(the dir verl loads, its torch_dist metadata) for what --mcore-ckpt names: our hf-mcore output, its release/,
    or a verl checkpoints dir or step (`convert mcore-hf` finds it the same way); (ckpt, None) when there is none."""
    from torch.distributed.checkpoint import FileSystemReader

    from converters.mcore.to_hf import find_dist_checkpoint
    from toolkit.errors import ConvertError

    try:
        found = find_dist_checkpoint(ckpt)
    except ConvertError:
        return ckpt, None
    return found, FileSystemReader(str(found)).read_metadata()


def _check_checkpoint(preflight: Preflight, ckpt: Path, metadata, config: dict) -> None:
    if metadata is None:
        preflight.add("dist checkpoint", False, f"{ckpt}: no .metadata; convert with `convert hf-mcore` first")
        return
    keys = metadata.state_dict_metadata
    layers = {int(k.split(".")[2]) for k in keys if k.startswith("decoder.layers.")}
    experts_key = next((k for k in keys if k.endswith("mlp.experts.experts.linear_fc2.weight")), None)
    experts = keys[experts_key].size[0] if experts_key else 0
    expected = (config["num_hidden_layers"], config.get("n_routed_experts") or 0)
    ok = (len(layers), experts) == expected
    preflight.add("dist checkpoint", ok, f"{ckpt}: {len(layers)} layers, {experts} experts" + ("" if ok else f"; the model has {expected[0]} layers, {expected[1]} experts"))


def _check_read_volume(preflight: Preflight, metadata, config: dict, plan: Plan) -> None:
    """The checkpoint's chunk layout against the plan, and what loading it reads (per node, cluster-wide).

    Informational: a global layout loads correctly, only slower (each TP/ETP rank reads whole tensors)."""
    if metadata is None:
        return
    from converters.mcore.mapping import plan_mapping
    from converters.mcore.params import hf_tensor_shapes
    from converters.mcore.read_cost import ParallelLayout, cluster_read, detect_alignment
    from converters.mcore.to_hf import detect_spec
    from toolkit.errors import ConvertError

    tp, etp = detect_alignment(metadata)
    wanted = f"--align-tp {plan.tp} --align-etp {plan.etp}"
    if (tp, etp) == (plan.tp, plan.etp):
        layout = f"chunks aligned to TP{tp} ETP{etp}, the plan's: each rank reads only its own slices"
    elif (tp, etp) == (1, 1):
        layout = f"global layout (whole tensors): each TP/ETP rank reads whole chunks; `convert hf-mcore ... {wanted}` writes the plan's layout"
    else:
        layout = f"chunks aligned to TP{tp} ETP{etp}, the plan has TP{plan.tp} ETP{plan.etp}; `convert hf-mcore ... {wanted}` writes the plan's layout"
    try:
        # what the model asks for: MTP layers only when config.json keeps them (patcher sets 0 for verl)
        mtp_layers = config.get("num_nextn_predict_layers") or 0
        spec = detect_spec(set(metadata.state_dict_metadata))
        mapping = plan_mapping(config, hf_tensor_shapes(config, mtp_layers), spec, drop_mtp=mtp_layers == 0)
        layout_sizes = ParallelLayout(plan.world, plan.tp, plan.pp, plan.ep, plan.etp, plan.cp, plan.first_stage_layers, plan.last_stage_layers)
        read = cluster_read(metadata, mapping, layout_sizes, plan.gpus_per_node)
    except (ConvertError, KeyError, ValueError) as exc:
        preflight.add("checkpoint read volume", True, f"{layout}; read volume not estimated ({exc})")
        return
    if read.missing:  # verl's load fails on a key the model asks for and the checkpoint lacks
        preflight.add("checkpoint read volume", False,
                      f"{len(read.missing)} tensor(s) the model asks for are not in the checkpoint, e.g. {read.missing[0]} "
                      "(MTP kept in config.json but converted with --drop-mtp? `patcher apply` the model dir, or reconvert)")
        return
    why = (f"; the {plan.dp} data-parallel replicas each read the slices they hold, so the cluster reads the checkpoint "
           f"~{read.over_checkpoint:.0f} times" if read.over_checkpoint >= 2 else "")
    preflight.add(
        "checkpoint read volume", True,
        f"{layout}. Each load (actor, then ref) reads {human_bytes(read.read_bytes)} cluster-wide "
        f"({read.over_checkpoint:.2f}x the checkpoint's {human_bytes(read.checkpoint_bytes)}, {read.over_needed:.2f}x what the ranks keep), "
        f"up to {human_bytes(max(read.per_node))} per node{why}",
    )


def _check_data(preflight: Preflight, data: Path) -> None:
    import pyarrow.parquet as pq

    needed = {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    for split in ("train", "test"):
        path = data / f"{split}.parquet"
        if not path.is_file():
            preflight.add(f"data {split}", False, f"{path} missing: run `convert math-lighteval`")
            continue
        schema = pq.read_schema(path)
        missing = needed - set(schema.names)
        rows = pq.ParquetFile(path).metadata.num_rows
        preflight.add(f"data {split}", not missing and rows > 0, f"{path}: {rows} rows" + (f", missing columns {sorted(missing)}" if missing else ""))


def prepare(plan: Plan, config: dict, model: Path, mcore_ckpt: Path, data: Path, sets: list[str], environ: Mapping[str, str],
            run: RunSettings) -> dict:
    """Everything `--dry-run` prints: plan, environment, exact command and the preflight results."""
    preflight = Preflight()
    verl_config = None
    environment = {**NODE_ENVIRONMENT, **run.environment}
    mcore_ckpt, metadata = dist_checkpoint(mcore_ckpt)  # verl wants the dir that holds metadata.json (and .metadata)
    verl_version = installed_verl()
    if verl_version is None:
        preflight.add("verl", False, "verl is not importable in this Python: pip install verl (training nodes)")
        overrides, command = [], []
    else:
        preflight.add("verl", True, f"verl {verl_version}")
        verl_dialect = dialect(verl_version)
        overrides = build_overrides(plan, model, mcore_ckpt, data, verl_dialect, sets, run=run)
        command = command_line(verl_dialect, overrides)
        result = validate_with_verl(verl_dialect, overrides)
        verl_config = result.get("config")
        preflight.add("verl config", result["ok"], "composed with every override; verl's validate_config passed" if result["ok"] else result["error"])
    preflight.add("plan", plan.world == plan.nodes * plan.gpus_per_node, f"{plan.nodes} x {plan.gpus_per_node} GPUs, DP={plan.dp}")
    _check_model(preflight, model)
    check_group_routing(preflight, config)
    from_dist_ckpt = verl_config is None or bool(verl_config["actor_rollout_ref"]["actor"]["megatron"].get("use_dist_checkpointing"))
    _check_hf_index(preflight, model, config, from_dist_ckpt)
    check_stack_settings(preflight, verl_config, environment, run.requirements)
    check_megatron(preflight, plan, verl_config, config)
    if from_dist_ckpt:
        _check_checkpoint(preflight, mcore_ckpt, metadata, config)
        _check_read_volume(preflight, metadata, config, plan)
    _check_data(preflight, data)
    _check_reward(preflight, run)
    _check_resume_path(preflight, run)
    check_checkpoints(preflight, config, run)
    cluster = cluster_from_env(environ, nodes=plan.nodes)
    return {
        "plan": plan_report(plan, config),
        "cluster": asdict(cluster),
        "environment": environment,
        "command": command,
        "preflight": [asdict(check) for check in preflight.checks],
        "ok": preflight.ok,
    }


def print_dry_run(report: dict) -> None:
    plan = report["plan"]
    print(f"plan: TP={plan['tp']} PP={plan['pp']} EP={plan['ep']} ETP={plan['etp']} CP={plan['cp']} DP={plan['dp']}, "
          f"stage layers first/last {plan['first_stage_layers']}/{plan['last_stage_layers']}, "
          f"rollout TP={plan['rollout_tp']} x {plan['vllm_engines']} engines")
    cluster = report["cluster"]
    print(f"cluster: node {cluster['node_rank']} of {cluster['nodes']}, head {cluster['head_address']} (from {cluster['source']})")
    print("environment: " + " ".join(f"{k}={v}" for k, v in report["environment"].items()))
    print("command:\n  " + " \\\n    ".join(report["command"]) if report["command"] else "command: (verl missing)")
    print("preflight:")
    for check in report["preflight"]:
        print(f"  [{'ok' if check['ok'] else 'FAIL'}] {check['name']}: {check['message']}")


def dry_run_json(report: dict) -> str:
    return json.dumps(report, indent=2, default=str)



@dataclass
class GrpoOptions:
    """What `launch grpo` was asked for (its flags, one field each)."""

    nodes: int
    model: Path
    mcore_ckpt: Path
    data: Path
    recipe: str | None = None
    gpus_per_node: int = 8
    gpu_mem_gb: float = 80
    sets: list[str] = field(default_factory=list)
    dry_run: bool = False
    node_rank: int | None = None
    head: str | None = None
    ray_port: int = 6379
    ray_address: str | None = None
    python: str = "python3"
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 8265
    join_timeout: float = 600
    run_dir: Path | None = None
    print_config: bool = False
    as_json: bool = False
    save_every: int = 20
    ckpt_dir: Path | None = None
    keep_ckpts: int | None = 2
    resume: str = "auto"
    reward_fn: str | None = None
    test_every: int = 10

    def resolved_run_dir(self) -> Path:
        return (self.run_dir or Path("runs") / time.strftime("grpo-%Y%m%d-%H%M%S")).resolve()

    def run_settings(self, run_dir: Path) -> RunSettings:
        reward_path, reward_name = None, "compute_score"
        if self.reward_fn:
            path, _, name = self.reward_fn.partition(":")
            reward_path, reward_name = Path(path).resolve(), name or "compute_score"
        resume = self.resume if self.resume in ("auto", "never") else str(Path(self.resume).resolve())
        return RunSettings(ckpt_dir=(self.ckpt_dir or run_dir / "checkpoints").resolve(), save_every=self.save_every,
                           keep=self.keep_ckpts, resume=resume, reward_path=reward_path, reward_name=reward_name,
                           test_every=self.test_every, requirements=stack_requirements())


def grpo_command(options: GrpoOptions) -> int:
    """`launch grpo`: the preflight (--dry-run), or verl on a Ray cluster this command starts or is given."""
    try:
        plan, config = make_plan(str(options.model), options.nodes, options.gpus_per_node, options.gpu_mem_gb, options.recipe)
    except PlanError as exc:
        print(f"launch grpo: error: {exc}", file=sys.stderr)
        return 2
    run_dir = options.resolved_run_dir()
    report = prepare(plan, config, options.model.resolve(), options.mcore_ckpt.resolve(), options.data.resolve(), options.sets, os.environ,
                     options.run_settings(run_dir))
    if options.dry_run:
        if options.as_json:
            print(dry_run_json(report))
        else:
            print_dry_run(report)
        return 0 if report["ok"] else 1
    if options.ray_address:
        return run_submit(options, report, run_dir)
    return run_cluster(options, plan, report, run_dir)


def preflight_failed(report: dict) -> bool:
    failed = [f"{c['name']}: {c['message']}" for c in report["preflight"] if not c["ok"]]
    if failed:
        print("launch grpo: preflight failed, nothing started:\n  " + "\n  ".join(failed), file=sys.stderr)
    return bool(failed)


def trainer_command(options: GrpoOptions, report: dict, run_dir: Path, python: str | None = None) -> list[str]:
    """verl's command for this run (with `python`, for another machine), recorded as RUN_DIR/command.json."""
    command = ([python] if python else report["command"][:1]) + report["command"][1:]
    if python is None:  # on this machine: hydra's outputs/<date>/<time> go into the run dir, not the current dir
        command.append(f"hydra.run.dir={(run_dir / 'hydra').resolve()}")
    command += ["--cfg", "job"] if options.print_config else []
    (run_dir / "command.json").write_text(json.dumps(command, indent=1))
    return command


def run_submit(options: GrpoOptions, report: dict, run_dir: Path) -> int:
    if preflight_failed(report):
        return 1
    run_dir.mkdir(parents=True, exist_ok=True)
    command = trainer_command(options, report, run_dir, options.python)
    print(f"submitting verl to the Ray cluster at {options.ray_address} (log: {run_dir / 'train.log'})", flush=True)
    try:
        code = submit_job(options.ray_address, command, run_dir / "train.log", report["environment"])
    except ClusterError as exc:
        print(f"launch grpo: error: {exc}", file=sys.stderr)
        return 1
    print(f"verl exited with code {code}", flush=True)
    return code


def run_cluster(options: GrpoOptions, plan: Plan, report: dict, run_dir: Path) -> int:
    cluster = cluster_from_env(os.environ, nodes=plan.nodes, node_rank=options.node_rank, head=options.head)
    spec = NodeSpec(cluster.node_rank, plan.nodes, plan.gpus_per_node, cluster.head_address, options.ray_port,
                    options.dashboard_host, options.dashboard_port)
    if spec.rank == 0 and preflight_failed(report):
        return 1
    run_dir.mkdir(parents=True, exist_ok=True)
    stop_on_sigterm()
    if spec.rank == 0 and spec.nodes > 1 and is_loopback(spec.head):
        print("launch grpo: note: a multi-node Ray cluster on loopback runs in Ray's cluster mode, which listens on "
              "every interface: run it inside a network namespace whose only interface is lo", file=sys.stderr)
    node = start_node(spec, report["environment"], run_dir / f"ray-node{spec.rank}.log")
    try:
        if spec.rank != 0:
            print(f"node {spec.rank}: joined the Ray head at {spec.address}; waiting for it to finish", flush=True)
            code = wait_until_head_leaves(node)
            print(f"node {spec.rank}: the head went away (ray exited {code})", flush=True)
            return 0
        try:
            joined = wait_for_nodes(spec, options.join_timeout)
        except ClusterError as exc:
            print(f"launch grpo: error: {exc}", file=sys.stderr)
            return 1
        print(f"all {len(joined)} nodes joined with {sum(joined.values()):.0f} GPUs; starting verl (log: {run_dir / 'train.log'})", flush=True)
        command = trainer_command(options, report, run_dir)
        code = run_on_cluster(command, run_dir / "train.log", report["environment"], spec)
        print(f"verl exited with code {code}", flush=True)
        return code
    except KeyboardInterrupt:
        print("launch grpo: interrupted; stopping the Ray processes this command started", file=sys.stderr)
        return 130
    finally:
        stop_node(node)
