"""Bytes each rank reads at load, measured through torch's reader in real Megatron-Core loads (CPU, gloo),
and the read plan that predicts them from `.metadata` alone."""

from __future__ import annotations

from pathlib import Path

import pytest
from convert_cli import convert as run_convert
from torch.distributed.checkpoint import FileSystemReader

from bench.load_reads import measure_load
from converters.hf.checkpoint import HFCheckpoint
from converters.mcore.mapping import plan_mapping
from converters.mcore.read_cost import ChunkIndex, ParallelLayout, Request, layer_stages, rank_requests
from converters.testing import make_fp8_checkpoint

# big enough that the DCP record framing (~2 KB read per stored chunk) stays small next to the data
SMALL = {"hidden_size": 512, "intermediate_size": 1024, "moe_intermediate_size": 384, "vocab_size": 1024}


def convert(*args: str) -> None:
    result = run_convert(*args)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("read-cost")
    source = root / "fp8"
    make_fp8_checkpoint(source, overrides=SMALL, shards=2)
    convert("hf-mcore", "--src", str(source), "--dst", str(root / "global"))
    convert("hf-mcore", "--src", str(source), "--dst", str(root / "aligned"), "--align-tp", "2")
    return {"source": source, "global": root / "global" / "release", "aligned": root / "aligned" / "release"}


def global_mapping(source: Path):
    checkpoint = HFCheckpoint(source)
    return plan_mapping(checkpoint.config, {name: checkpoint.shape(name) for name in checkpoint.names()})


def ratio(record: dict) -> float:
    count = record["count"]
    return count["stream_tensor_bytes"] / count["needed_bytes"]


def check_read_plan(records: list[dict], release: Path, layout: ParallelLayout, source: Path) -> None:
    """The slices each real rank asked for are the ones rank_requests predicts, and the read plan from
    `.metadata` gives the stored bytes the counting reader saw."""
    mapping = global_mapping(source)
    index = ChunkIndex(FileSystemReader(str(release)).read_metadata())
    for record in records:
        predicted = rank_requests(mapping, layout, record["rank"])
        assert sorted(predicted, key=repr) == sorted(record["requests"], key=repr), record["rank"]
        plan = index.plan(predicted)
        assert not plan.missing
        assert (plan.record_bytes, plan.needed_bytes) == (record["count"]["record_bytes"], record["count"]["needed_bytes"])


def test_tp2_aligned_reads_own_bytes_global_reads_twice(small):
    layout = ParallelLayout(world=2, tp=2)
    aligned = measure_load(small["source"], small["aligned"], tp=2)
    whole = measure_load(small["source"], small["global"], tp=2)
    for record in aligned:
        assert ratio(record) <= 1.05, record
    for record in whole:
        assert ratio(record) > 1.5, record  # every TP-split tensor read whole by both ranks
    assert aligned[0]["count"]["needed_bytes"] == whole[0]["count"]["needed_bytes"]
    check_read_plan(aligned, small["aligned"], layout, small["source"])
    check_read_plan(whole, small["global"], layout, small["source"])


def test_ep2_both_layouts_read_own_bytes(small):
    """At TP1 x EP2 each rank asks for whole tensors and its own experts: one chunk per expert is enough,
    and a TP2-aligned checkpoint costs nothing extra at another TP."""
    for release in (small["aligned"], small["global"]):
        records = measure_load(small["source"], release, ep=2)
        for record in records:
            assert ratio(record) <= 1.05, (release, record)
        check_read_plan(records, release, ParallelLayout(world=2, ep=2), small["source"])


@pytest.mark.slow
def test_tp2_ep2_matches_megatron_sharding(small):
    """4 ranks, TP2 x EP2 (ETP2): the sharding table against megatron-core's own sharded_state_dict, and
    the measured reads: aligned = own bytes, global = more than 1.5x."""
    layout = ParallelLayout(world=4, tp=2, ep=2)
    aligned = measure_load(small["source"], small["aligned"], tp=2, ep=2)
    check_read_plan(aligned, small["aligned"], layout, small["source"])
    assert all(ratio(record) <= 1.05 for record in aligned), aligned
    whole = measure_load(small["source"], small["global"], tp=2, ep=2)
    assert all(ratio(record) > 1.5 for record in whole), whole


def test_rank_coordinates_and_stages_follow_megatron_order():
    layout = ParallelLayout(world=128, tp=4, pp=16, ep=2, etp=4, first_stage_layers=3, last_stage_layers=2)
    assert layout.dp == 2 and layout.expert_dp == 1
    assert layout.coordinates(0) == {"tp": 0, "cp": 0, "dp": 0, "pp": 0, "etp": 0, "ep": 0, "edp": 0}
    assert layout.coordinates(13) == {"tp": 1, "cp": 0, "dp": 1, "pp": 1, "etp": 1, "ep": 1, "edp": 0}
    stages = layer_stages(61, layout)
    assert stages.count(0) == 3 and stages.count(15) == 2 and all(stages.count(s) == 4 for s in range(1, 15))


def test_overlapping_chunks_are_counted_whole_once_per_request(small):
    """A request that overlaps two chunks reads both whole; two requests in one chunk read it twice."""
    index = ChunkIndex(FileSystemReader(str(small["global"])).read_metadata())
    key = "decoder.layers.0.mlp.linear_fc1.weight"  # gate rows [0, 1024), up rows [1024, 2048), 512 wide
    both_halves = index.plan([Request(key, (512, 0), (1024, 512))])
    assert both_halves.needed_bytes == 1024 * 512 * 2 and both_halves.record_bytes >= 2 * 1024 * 512 * 2
    twice = index.plan([Request(key, (0, 0), (512, 512)), Request(key, (512, 0), (512, 512))])
    assert twice.record_bytes == 2 * index.plan([Request(key, (0, 0), (1024, 512))]).record_bytes


def test_deepseek_v3_seed_plan_reads_the_checkpoint_once_when_aligned():
    """Full-size read plan (bench/read_plan.py) for TP4 PP16 EP2 ETP4 on 128 GPUs: the target holds."""
    from bench.read_plan import global_mapping, layout_metadata
    from converters.mcore.read_cost import cluster_read
    from converters.testing import deepseek_v3_config

    layout = ParallelLayout(world=128, tp=4, pp=16, ep=2, etp=4, first_stage_layers=3, last_stage_layers=2)
    mapping = global_mapping(deepseek_v3_config())
    aligned = cluster_read(layout_metadata("aligned", mapping, 4, 4), mapping, layout)
    whole = cluster_read(layout_metadata("global", mapping, 4, 4), mapping, layout)
    assert not aligned.missing and aligned.read_bytes == aligned.needed_bytes
    assert aligned.over_checkpoint <= 1.05 < 3.5 < whole.over_checkpoint
    assert len(aligned.per_node) == 16 and max(aligned.per_node) < max(whole.per_node) / 3.5
