"""patcher against the real files of released megatron-core wheels (fetched once, cached)."""

from __future__ import annotations

import difflib
import json
import shutil

import pytest

from patcher.cli import main

pytestmark = pytest.mark.network

FILES = {
    "seed-edit": "megatron/core/models/gpt/gpt_layer_specs.py",
    "export-flag": "megatron/core/extensions/transformer_engine.py",
    "rope-gradient": "megatron/core/transformer/multi_latent_attention.py",
    "q-proj-norm": "megatron/core/transformer/mla_qk_norm_config.py",  # 0.19+ only
}
NATIVE_COLUMN = {"seed-edit": "not-needed", "export-flag": "not-needed", "rope-gradient": "needed", "q-proj-norm": "not-needed"}
DUPLICATED = {"seed-edit": "on-request", "export-flag": "needed", "rope-gradient": "not-needed", "q-proj-norm": "not-needed"}
UPSTREAM_FLAG = {"seed-edit": "on-request", "export-flag": "upstream", "rope-gradient": "not-needed", "q-proj-norm": "not-needed"}
QK_NORM_RESOLVER = {**UPSTREAM_FLAG, "q-proj-norm": "needed"}

# version -> (state of each patch before apply, patches applied by default, by --seed-edit)
RELEASES = {
    "0.12.3": (NATIVE_COLUMN, {"rope-gradient"}, {"rope-gradient"}),
    "0.13.1": (NATIVE_COLUMN, {"rope-gradient"}, {"rope-gradient"}),
    "0.14.0": (DUPLICATED, {"export-flag"}, {"export-flag", "seed-edit", "rope-gradient"}),
    "0.15.3": (DUPLICATED, {"export-flag"}, {"export-flag", "seed-edit", "rope-gradient"}),
    "0.16.1": (DUPLICATED, {"export-flag"}, {"export-flag", "seed-edit", "rope-gradient"}),
    "0.17.1": (UPSTREAM_FLAG, set(), {"seed-edit", "rope-gradient"}),
    "0.18.2": (UPSTREAM_FLAG, set(), {"seed-edit", "rope-gradient"}),
    "0.19.2": (QK_NORM_RESOLVER, {"q-proj-norm"}, {"seed-edit", "rope-gradient", "q-proj-norm"}),
}
# seed-edit: the duplicated builder calls rewritten per release (TE spec, plus the inference spec from 0.16)
SEED_SITES = {"0.14.0": 2, "0.15.3": 2, "0.16.1": 4, "0.17.1": 4, "0.18.2": 4, "0.19.2": 4}


def added_and_removed(before: str, after: str) -> tuple[list[str], list[str]]:
    lines = [
        line
        for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    return [line[1:] for line in lines if line[0] == "+"], [line[1:] for line in lines if line[0] == "-"]


def read_files(site) -> dict[str, bytes | None]:
    """Each patched file's bytes (None: this release has no such file)."""
    return {name: (site / path).read_bytes() if (site / path).is_file() else None for name, path in FILES.items()}


def status_json(site, capsys) -> tuple[int, dict]:
    code = main(["status", "--json", str(site)])
    return code, json.loads(capsys.readouterr().out)


def check_change(name: str, before: str, after: str, version: str) -> None:
    """Exactly the statements each codemod adds, nothing else, and the result still compiles."""
    added, removed = added_and_removed(before, after)
    compile(after, FILES[name], "exec")
    if name == "seed-edit":
        assert len(removed) == SEED_SITES[version] and all("down_proj=backend.linear()" in line for line in removed)
        assert sorted(line.replace("column_parallel_linear", "linear") for line in added) == sorted(removed)
        return
    if name == "q-proj-norm":  # the codemod's own lines are pinned in test_q_proj_norm.py; here: it finds its change
        from patcher import mla_q_proj_norm

        assert added and mla_q_proj_norm.scan(after).state == mla_q_proj_norm.PRESENT and mla_q_proj_norm.rewrite(after) == after
        return
    assert removed == []
    code = [line.strip() for line in added if not line.strip().startswith("#")]
    if name == "export-flag":
        assert code in (['setattr(param, "tensor_model_parallel", False)'], ["setattr(param, 'tensor_model_parallel', False)"])
        return
    assert code == ["copy_to_tensor_model_parallel_region,", "k_pos_emb = copy_to_tensor_model_parallel_region(k_pos_emb)"]
    # the new statement sits right after the split of the gathered kv_combined
    lines = after.splitlines()
    index = next(i for i, line in enumerate(lines) if line.strip() == code[1])
    split_end = max(i for i in range(index) if "kv_combined, [self.config.kv_lora_rank" in lines[i])
    assert lines[split_end + 1].strip() == ")" and all(line.strip().startswith("#") for line in lines[split_end + 2 : index])
    assert "gather_from_tensor_model_parallel_region(kv_combined)" in "\n".join(lines[split_end - 6 : split_end])


@pytest.mark.parametrize("seed_edit", [False, True], ids=["default", "seed-edit"])
@pytest.mark.parametrize("version", sorted(RELEASES))
def test_release(version, seed_edit, mcore_release, capsys):
    site = mcore_release(version)
    states, default, with_seed = RELEASES[version]
    expected = with_seed if seed_edit else default
    originals = read_files(site)

    code, status = status_json(site, capsys)
    assert status["version"] == version
    assert {p["name"]: p["state"] for p in status["patches"]} == states
    assert code == (1 if "needed" in states.values() else 0)

    flags = ["--seed-edit"] if seed_edit else []
    assert main(["apply", "--dry-run", *flags, str(site)]) == 0
    diff = capsys.readouterr().out
    assert {name for name, path in FILES.items() if f"+++ b/{site / path}" in diff} == expected
    assert read_files(site) == originals

    assert main(["apply", *flags, str(site)]) == 0
    capsys.readouterr()
    changed = {name for name, content in read_files(site).items() if content != originals[name]}
    assert changed == expected
    for name in changed:
        check_change(name, originals[name].decode(), (site / FILES[name]).read_text(), version)
        assert (site / (FILES[name] + ".orig")).read_bytes() == originals[name]
    code, after = status_json(site, capsys)
    assert code == 0 and after["state"] == ("applied" if expected else "not-needed")
    assert all(p["state"] == "applied" for p in after["patches"] if p["name"] in expected)
    patched = read_files(site)
    assert main(["apply", *flags, str(site)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert read_files(site) == patched

    assert main(["revert", str(site)]) == 0
    assert read_files(site) == originals
    assert not list(site.rglob("*.orig"))


def test_seed_edit_alone_is_reported_harmful_and_default_apply_adds_the_rope_fix(mcore_release, capsys):
    """A tree carrying only the how-to's edit (made by hand or by an older patcher) needs the rope fix."""
    site = mcore_release("0.16.1")
    spec = site / FILES["seed-edit"]
    shutil.copy2(spec, spec.with_name(spec.name + ".orig"))
    spec.write_text(spec.read_text().replace("down_proj=backend.linear()", "down_proj=backend.column_parallel_linear()"))
    code, status = status_json(site, capsys)
    states = {p["name"]: p for p in status["patches"]}
    assert code == 1 and states["seed-edit"]["state"] == "applied"
    assert states["rope-gradient"]["state"] == "needed" and "column-parallel" in states["rope-gradient"]["message"]
    assert states["export-flag"]["state"] == "needed"  # judged on the release as shipped (the .orig)
    assert main(["apply", str(site)]) == 0
    capsys.readouterr()
    code, status = status_json(site, capsys)
    states = {p["name"]: p["state"] for p in status["patches"]}
    assert code == 0 and states.pop("q-proj-norm") == "not-needed"  # 0.16 has no q-norm resolver
    assert set(states.values()) == {"applied"}


def test_newest_release_fused_site_is_recognised(mcore_release, capsys):
    site = mcore_release("0.19.2")
    code, status = status_json(site, capsys)
    assert code == 1 and [p["name"] for p in status["patches"] if p["state"] == "needed"] == ["q-proj-norm"]
    fused = [s for s in status["sites"] if s["argument"] == "linear_qkv_down_proj"]
    assert len(fused) == 1
    assert fused[0]["state"] == "fused-column-parallel"
    assert fused[0]["function"] == "get_gpt_layer_with_transformer_engine_submodules"
    rope = next(p for p in status["patches"] if p["name"] == "rope-gradient")
    assert "--rope-fix" in rope["message"]
    assert main(["apply", "--rope-fix", str(site)]) == 0
    capsys.readouterr()
    _, status = status_json(site, capsys)
    assert {p["name"]: p["state"] for p in status["patches"]}["rope-gradient"] == "applied"


@pytest.mark.parametrize(
    "name, edit, message",
    [
        ("rope-gradient", ("kv_compressed, k_pos_emb = torch.split(", "kv_compressed, k_pos_emb = my_split("), "torch.split"),
        ("rope-gradient", ("                kv_compressed = scatter_to_sequence_parallel_region(kv_compressed)\n", "                kv_compressed = scatter_to_sequence_parallel_region(kv_compressed)\n            k_pos_emb = k_pos_emb * 2\n"), "does not know"),
        ("export-flag", ('setattr(param, "sequence_parallel", self.config.sequence_parallel)', "pass"), "sequence_parallel"),
        ("export-flag", ("class TELinear(", "class TELinearRenamed("), "no class TELinear"),
    ],
)
def test_unknown_structures_are_refused_with_file_and_line(mcore_release, capsys, name, edit, message):
    site = mcore_release("0.16.1")
    path = site / FILES[name]
    text = path.read_text()
    assert text.count(edit[0]) >= 1
    path.write_text(text.replace(edit[0], edit[1], 1))
    before = read_files(site)
    assert main(["apply", str(site)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err
    assert read_files(site) == before
    assert not list(site.rglob("*.orig"))
