"""q-proj-norm (patcher/mla_q_proj_norm.py) on the real files of released megatron-core wheels.

megatron-core 0.19 resolves MLA's projections in transformer/mla_qk_norm_config.py and, with
qk_layernorm and no query LoRA, fuses a q norm into `linear_q_proj` (TE) or refuses the local spec.
Releases up to 0.18 have no such file and build `linear_q_proj` from the spec.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from patcher import mla_q_proj_norm
from patcher.megatron_tree import QK_NORM_RELATIVE, MegatronTree
from patcher.states import APPLIED, NEEDED, NOT_NEEDED, UNSUPPORTED, PatchError

pytestmark = pytest.mark.network

REPO = Path(__file__).resolve().parents[2]
RESOLVER = "megatron/core/transformer/mla_qk_norm_config.py"
OLDER = ["0.12.3", "0.13.1", "0.14.0", "0.15.3", "0.16.1", "0.17.1", "0.18.2"]
FUSING = ["0.19.2"]

REMOVED = [
    'linear_q_proj_cls = self._mla_fused_linear_or_default(',
    'self.submodules.linear_q_proj, "linear_q_proj"',
    ')',
    'if not self.has_q_lora and not self._is_trivial(self.submodules.q_layernorm):',
    'self._raise_unused_q_norm()',
]
ADDED_CODE = ["linear_q_proj_cls = self.submodules.linear_q_proj or self.linear_impl"]


def changed_lines(before: str, after: str) -> tuple[list[str], list[str]]:
    import difflib

    lines = [line for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
             if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    return [line[1:].strip() for line in lines if line[0] == "-"], [line[1:].strip() for line in lines if line[0] == "+"]


def q_proj_state(tree: MegatronTree):
    return next(state for state in tree.patch_states() if state.name == "q-proj-norm")


@pytest.mark.parametrize("version", OLDER)
def test_releases_without_the_resolver_do_not_need_it(version, mcore_release):
    site = mcore_release(version)
    assert not (site / RESOLVER).exists()
    tree = MegatronTree.at(site / "megatron")
    assert q_proj_state(tree).state == NOT_NEEDED
    tree.apply()
    assert q_proj_state(tree).state == NOT_NEEDED and not (site / RESOLVER).exists()


@pytest.mark.parametrize("version", FUSING)
def test_fusing_release_is_detected_applied_and_reverted(version, mcore_release):
    site = mcore_release(version)
    path = site / RESOLVER
    original = path.read_bytes()
    tree = MegatronTree.at(site / "megatron")
    assert tree.q_proj_norm.path == site / "megatron" / QK_NORM_RELATIVE

    state = q_proj_state(tree)
    assert state.state == NEEDED and state.line is not None and "linear_q_proj" in state.message
    assert "linear_q_proj_cls = self._mla_fused_linear_or_default(" in original.decode().splitlines()[state.line - 1]

    dry = tree.apply(dry_run=True)
    assert not dry.changed and f"+++ b/{path}" in dry.diff and path.read_bytes() == original

    outcome = tree.apply()
    assert outcome.changed and "q-proj-norm" in outcome.message
    after = path.read_text()
    compile(after, RESOLVER, "exec")
    removed, added = changed_lines(original.decode(), after)
    assert removed == REMOVED
    assert [line for line in added if not line.startswith("#")] == ADDED_CODE
    assert (site / (RESOLVER + ".orig")).read_bytes() == original
    # the plain projection sits in the no-query-LoRA branch of the MLA resolution (the disabled-norm
    # branch above already has the same line)
    lines = after.splitlines()
    index = max(i for i, line in enumerate(lines) if line.strip() == ADDED_CODE[0])
    assert lines[index - 3].strip() == "else:" and "def _resolve_mla_qk_layernorm" in "\n".join(lines[index - 20 : index])

    assert q_proj_state(tree).state == APPLIED
    assert mla_q_proj_norm.scan(after).state == mla_q_proj_norm.PRESENT
    again = tree.apply()
    assert not again.changed and "nothing to do" in again.message and path.read_text() == after

    assert tree.revert().changed
    assert path.read_bytes() == original and not list(site.rglob("*.orig"))
    assert q_proj_state(tree).state == NEEDED


@pytest.mark.parametrize(
    "old, new",
    [
        ('self.submodules.linear_q_proj, "linear_q_proj"\n', "self.submodules.linear_q_proj, 'q_proj'\n"),
        ("class QKNormConfigResolver:", "class QKNormResolver:"),
        ("            self._raise_unused_q_norm()\n        if self.has_q_lora:", "            pass\n        if self.has_q_lora:"),
    ],
    ids=["other-argument", "renamed-class", "check-changed"],
)
def test_unknown_structures_are_refused(mcore_release, old, new):
    site = mcore_release("0.19.2")
    path = site / RESOLVER
    text = path.read_text()
    assert text.count(old) == 1
    path.write_text(text.replace(old, new))
    edited = path.read_bytes()
    tree = MegatronTree.at(site / "megatron")
    assert q_proj_state(tree).state == UNSUPPORTED and str(path) in q_proj_state(tree).message
    with pytest.raises(PatchError):
        tree.apply()
    assert path.read_bytes() == edited and not list(site.rglob("*.orig"))


def _unpacked_release(version: str, tmp_path: Path) -> Path:
    from conftest import fetch_mcore_wheel

    site = tmp_path / f"site-{version}"
    with zipfile.ZipFile(fetch_mcore_wheel(version)) as archive:
        # the dist-info too: the checker reports the version from the package metadata
        archive.extractall(site, [name for name in archive.namelist() if name.startswith(("megatron/", "megatron_core-"))])
    return site


def _check(site: Path, hf: Path, mcore: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    return subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "converters.mcore.check", "--hf", str(hf), "--mcore", str(mcore),
         "--spec", "local", "--backend", "cpu", "--json"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=900,
    )


@pytest.mark.slow
def test_local_spec_q_lora_null_model_on_0_19_builds_and_matches_hf_only_when_patched(tmp_path):
    """The CPU proof: megatron-core 0.19.2's local spec refuses a q_lora_rank-null model; patched, its
    logits match transformers' as on 0.16.1 (the TE spec's fused norm needs a GPU with Transformer Engine)."""
    import json

    from convert_cli import convert, to_mcore

    from converters.mcore.check import ATOL
    from converters.testing import make_fp8_checkpoint

    fp8, bf16 = tmp_path / "fp8", tmp_path / "bf16"
    make_fp8_checkpoint(fp8, overrides={"q_lora_rank": None, "num_nextn_predict_layers": 0}, shards=2)
    assert convert("fp8-bf16", "--src", str(fp8), "--dst", str(bf16)).returncode == 0
    release = to_mcore(fp8, tmp_path / "mcore", "--spec", "local")
    site = _unpacked_release("0.19.2", tmp_path)

    unpatched = _check(site, bf16, release)
    assert unpatched.returncode != 0
    assert "q_lora_rank is None" in unpatched.stderr and "mla_qk_norm_config.py" in unpatched.stderr

    assert MegatronTree.at(site / "megatron").apply().changed
    patched = _check(site, bf16, release)
    assert patched.returncode == 0, patched.stderr[-3000:]
    report = json.loads(patched.stdout)
    assert report["versions"]["megatron-core"] == "0.19.2"
    assert report["loaded"] and not report["missing"] and report["max_abs_diff"] <= ATOL
