"""`launch doctor`: installed versions against the tested matrix, the Megatron patches and what this stack needs."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version

# package -> (the seed how-to's tested version, verl 0.9.1's pin or our tested version)
MATRIX: dict[str, tuple[str, str]] = {
    "torch": ("2.6.0", "2.11.0 (verl 0.9.1 vllm extra); 2.13.0 CPU in our CI"),
    "vllm": ("0.8.5", "0.24.0"),
    "verl": ("(Pai fork)", "0.9.1"),
    "megatron-core": ("0.15.0rc3 (Megatron-LM-250908)", "0.16.1 in our CI; 0.12-0.19 patchable"),
    "transformer-engine": ("2.7", "per megatron-core"),
    "transformers": ("4.56.2", "5.9.0"),
    "ray": ("2.46.0", "2.60.0 in our CI"),
    "nvidia-cudnn-cu12": ("9.8.0.87", "-"),
}
DISTRIBUTIONS = {"transformer-engine": ("transformer-engine", "transformer_engine", "transformer-engine-torch")}


@dataclass
class Row:
    package: str
    installed: str | None
    seed: str
    current: str


def installed_version(package: str) -> str | None:
    for name in DISTRIBUTIONS.get(package, (package,)):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def report() -> dict:
    rows = [Row(package, installed_version(package), seed, current) for package, (seed, current) in MATRIX.items()]
    cuda = None
    try:
        import torch

        cuda = {"available": torch.cuda.is_available(), "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    except ImportError:
        pass
    from patcher.stack import tree_advice
    from patcher.states import PatchError
    from patcher.targets import resolve

    try:
        status = resolve(None).detect()
        patch = {
            "state": status.state,
            "version": status.version,
            "message": status.message,
            "path": status.path,
            "patches": status.patches,
            "advice": tree_advice(status),
        }
    except PatchError as exc:
        patch = {"state": "unavailable", "message": str(exc)}
    return {"packages": [asdict(row) for row in rows], "cuda": cuda, "megatron_patch": patch}


def print_report(data: dict) -> None:
    print(f"{'package':<20} {'installed':<16} {'seed (how-to)':<32} current")
    for row in data["packages"]:
        print(f"{row['package']:<20} {row['installed'] or '-':<16} {row['seed']:<32} {row['current']}")
    if data["cuda"]:
        print(f"CUDA available: {data['cuda']['available']}  (torch built for CUDA {data['cuda']['cuda']}, cuDNN {data['cuda']['cudnn']})")
    patch = data["megatron_patch"]
    print(f"Megatron patches (megatron-core {patch.get('version') or '-'}): {patch['state']}")
    for state in patch.get("patches", []):
        print(f"  {state['name']:<14} {state['state']:<11} {state['message']}")
    advice = patch.get("advice")
    if advice:
        stack = advice["stack"]
        print(f"Stack: verl {stack['verl'] or '-'}, mbridge {stack['mbridge'] or '-'}, megatron-bridge {stack['megatron_bridge'] or '-'}; exporter {advice['exporter'] or 'unknown'}")
        for reason in advice["reasons"]:
            print(f"  {reason}")
        if advice["harmful"]:
            print(f"  HARMFUL: {'; '.join(advice['harmful'])}")


def doctor_command(as_json: bool) -> int:
    """`launch doctor`: 0 when the Megatron patches are applied or not needed, else 1."""
    data = report()
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        print_report(data)
    return 0 if data["megatron_patch"]["state"] in ("applied", "not-needed") else 1
