"""hf-mcore --align-tp/--align-etp: chunks cut at the slices Megatron ranks ask for, still loading at any TP/EP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from convert_cli import convert, to_mcore
from torch.distributed.checkpoint import FileSystemReader

from converters.hf.checkpoint import HFCheckpoint
from converters.mcore.check import ATOL, compare
from converters.mcore.from_hf import McoreOptions, _chunk_reader, plan_conversion
from converters.mcore.mapping import Chunk, McoreTensor
from converters.mcore.tp_layout import LayoutError, align_tensor, sharding_of
from converters.testing import dequantised, load_checkpoint


@pytest.fixture(scope="module")
def models(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp-layout")
    return {**tiny_checkpoints, "root": root, "tp2": to_mcore(tiny_checkpoints["fp8"], root / "tp2", "--align-tp", "2")}


def boxes(tensor: McoreTensor) -> list[tuple[tuple[int, ...], tuple[int, ...], str, object, object]]:
    return [(c.offsets, c.sizes, c.source, c.rows, c.cols) for c in tensor.chunks]


def test_swiglu_halves_are_cut_each_on_its_own():
    fc1 = McoreTensor("decoder.layers.0.mlp.linear_fc1.weight", (12, 5), [Chunk((0, 0), (6, 5), "gate"), Chunk((6, 0), (6, 5), "up")])
    assert boxes(align_tensor(fc1, tp=2, etp=1)) == [
        ((0, 0), (3, 5), "gate", (0, 3), None),
        ((3, 0), (3, 5), "gate", (3, 6), None),
        ((6, 0), (3, 5), "up", (0, 3), None),
        ((9, 0), (3, 5), "up", (3, 6), None),
    ]


def test_row_parallel_and_expert_tensors():
    proj = McoreTensor("decoder.layers.0.self_attention.linear_proj.weight", (4, 8), [Chunk((0, 0), (4, 8), "o")])
    assert boxes(align_tensor(proj, tp=4, etp=1)) == [((0, c), (4, 2), "o", None, (c, c + 2)) for c in (0, 2, 4, 6)]
    fc2 = McoreTensor("decoder.layers.1.mlp.experts.experts.linear_fc2.weight", (2, 4, 6),
                      [Chunk((e, 0, 0), (1, 4, 6), f"down{e}") for e in range(2)])
    # experts follow ETP, not TP
    assert boxes(align_tensor(fc2, tp=4, etp=2)) == [((e, 0, c), (1, 4, 3), f"down{e}", None, (c, c + 3)) for e in range(2) for c in (0, 3)]
    fc1 = McoreTensor("decoder.layers.1.mlp.experts.experts.linear_fc1.weight", (1, 8, 3),
                      [Chunk((0, 0, 0), (1, 4, 3), "g"), Chunk((0, 4, 0), (1, 4, 3), "u")])
    assert [b[:2] for b in boxes(align_tensor(fc1, tp=1, etp=2))] == [((0, r, 0), (1, 2, 3)) for r in (0, 2, 4, 6)]


def test_replicated_tensors_stay_whole_and_unknown_keys_are_refused():
    for key in ("decoder.layers.0.input_layernorm.weight", "decoder.layers.3.mlp.router.weight", "mtp.layers.0.enorm.weight",
                "decoder.layers.0.self_attention.linear_kv_up_proj.layer_norm_weight"):
        tensor = McoreTensor(key, (8, 4), [Chunk((0, 0), (8, 4), "x")])
        assert align_tensor(tensor, tp=4, etp=4) is tensor
    assert sharding_of("embedding.word_embeddings.weight", 2).axis == 0
    with pytest.raises(LayoutError, match="decoder.layers.0.mystery.weight"):
        sharding_of("decoder.layers.0.mystery.weight", 2)


def test_aligned_chunks_hold_the_exact_slices_of_the_fp8_source(models):
    """Every aligned chunk (FP8 row ranges off the 128-row blocks, column slices) equals that slice of the
    dequantised tensor; a row-parallel tensor is read and dequantised once for all its column slices."""
    plan = plan_conversion(models["fp8"], models["root"] / "unused", McoreOptions(align_tp=2, align_etp=2))
    reference = dequantised(load_checkpoint(models["fp8"]))
    source = HFCheckpoint(models["fp8"])
    reader = _chunk_reader(source)
    column_sliced, unaligned_rows = set(), set()
    for piece in (p for group in plan.bins for p in group if p.chunk is not None):
        chunk = piece.chunk
        expected = reference[chunk.source]
        if chunk.rows:
            expected = expected[chunk.rows[0]:chunk.rows[1]]
            if source.is_fp8(chunk.source) and chunk.rows[0] % 128:
                unaligned_rows.add(chunk.source)
        if chunk.cols:
            expected = expected[:, chunk.cols[0]:chunk.cols[1]]
            column_sliced.add(chunk.source)
        assert torch.equal(reader(chunk).view(torch.uint8), expected.contiguous().view(torch.uint8)), chunk
    assert unaligned_rows and column_sliced
    # each of those sources (all small here) dequantised once, whatever the number of its slices
    assert reader.units_read == len(column_sliced | unaligned_rows)


def test_aligned_layout_on_disk(models):
    metadata = FileSystemReader(str(models["tp2"])).read_metadata().state_dict_metadata
    chunks = {key: sorted((tuple(c.offsets), tuple(c.sizes)) for c in meta.chunks) for key, meta in metadata.items() if hasattr(meta, "chunks")}
    assert chunks["decoder.layers.0.mlp.linear_fc1.weight"] == [((0, 0), (132, 200)), ((132, 0), (132, 200)), ((264, 0), (132, 200)), ((396, 0), (132, 200))]
    assert chunks["decoder.layers.0.self_attention.linear_proj.weight"] == [((0, 0), (200, 64)), ((0, 64), (200, 64))]
    assert chunks["decoder.layers.1.mlp.experts.experts.linear_fc2.weight"][:2] == [((0, 0, 0), (1, 200, 68)), ((0, 0, 68), (1, 200, 68))]
    assert chunks["embedding.word_embeddings.weight"] == [((0, 0), (160, 200)), ((160, 0), (160, 200))]
    assert chunks["decoder.layers.0.input_layernorm.weight"] == [((0,), (200,))]


def test_recipe_takes_tp_and_etp_from_the_plan(models, tmp_path):
    from toolkit.recipes import RECIPES

    release = to_mcore(models["fp8"], tmp_path / "recipe", "--recipe", "pai-16x8", "--json")
    plan = RECIPES["pai-16x8"]
    experts = FileSystemReader(str(release)).read_metadata().state_dict_metadata["decoder.layers.1.mlp.experts.experts.linear_fc1.weight"]
    assert len(experts.chunks) == 8 * 2 * plan.etp  # experts x halves x ETP slices
    assert json.loads((release / ".hf-mcore-source.json").read_text())["align_tp_etp"] == [plan.tp, plan.etp]
    for bad in (["--recipe", "nope"], ["--recipe", "pai-16x8", "--align-tp", "2"]):
        result = convert("hf-mcore", "--src", str(models["fp8"]), "--dst", str(tmp_path / "bad"), *bad)
        assert result.returncode == 2 and "recipe" in result.stderr


def test_aligned_round_trip_to_hf_is_byte_identical(models, tmp_path):
    back = tmp_path / "back"
    result = convert("mcore-hf", "--src", str(models["tp2"].parent), "--hf-config", str(models["bf16"]), "--dst", str(back))
    assert result.returncode == 0, result.stderr
    original, exported = load_checkpoint(models["bf16"]), load_checkpoint(back)
    assert set(original) == set(exported)
    for name, tensor in original.items():
        assert torch.equal(exported[name].view(torch.uint8), tensor.view(torch.uint8)), name


@pytest.mark.parametrize("layout", [{"tp": 1}, {"tp": 2}, {"ep": 2}], ids=["tp1", "tp2", "ep2"])
def test_tp2_aligned_checkpoint_loads_and_matches_hf(models, layout):
    assert compare(models["bf16"], models["tp2"], spec="te", **layout) <= ATOL


def test_tp1_layout_loads_at_tp2(models, tmp_path):
    tp1 = to_mcore(models["fp8"], tmp_path / "tp1", "--align-tp", "1")
    assert compare(models["bf16"], tp1, spec="te", tp=2) <= ATOL


def _save_at_tp2(rank: int, port: int, hf_dir: str, mcore_dir: str, out: str) -> None:
    """Load our checkpoint into a real TP2 model and save it with megatron-core's own writer, as verl does."""
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from converters.mcore.check import build_model
    from converters.mcore.shim import install_cpu_shim
    from converters.mcore.world import init_distributed

    install_cpu_shim()
    init_distributed(rank, 2, port, tp=2)
    model = build_model(json.loads((Path(hf_dir) / "config.json").read_text()), 2, 1, 1, "te")
    metadata = {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    state = dist_checkpointing.load(model.sharded_state_dict(metadata=metadata), mcore_dir, strict=StrictHandling.ASSUME_OK_UNEXPECTED)
    model.load_state_dict({k: v for k, v in state.items() if k not in ("checkpoint_version", "iteration")}, strict=False)
    Path(out).mkdir(exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(metadata=metadata), out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_megatron_saved_tp2_checkpoint_exports_to_hf(models, tmp_path):
    """A checkpoint written by megatron-core's own save at TP2 (chunks = the ranks' slices, float32 as the
    model holds them) exports to the same values."""
    from converters.mcore.read_cost import detect_alignment
    from converters.mcore.world import free_port

    saved = tmp_path / "saved"
    torch.multiprocessing.start_processes(_save_at_tp2, args=(free_port(), str(models["bf16"]), str(models["tp2"]), str(saved)),
                                          nprocs=2, start_method="spawn", join=True)
    assert detect_alignment(FileSystemReader(str(saved)).read_metadata()) == (2, 2)
    back = tmp_path / "back"
    result = convert("mcore-hf", "--src", str(saved), "--hf-config", str(models["bf16"]), "--dst", str(back))
    assert result.returncode == 0, result.stderr
    original, exported = load_checkpoint(models["bf16"]), load_checkpoint(back)
    assert set(original) == set(exported)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor.to(exported[name].dtype)), name


def test_threads_share_units_in_any_order(models):
    """Reader threads making column slices of the same units concurrently, asked for in any order, give the
    same bytes as a fresh single-threaded reader, with pooled buffers recycled by the writer."""
    from converters.hf.buffers import BufferPool
    from converters.mcore import dist_ckpt

    plan = plan_conversion(models["fp8"], models["root"] / "unused", McoreOptions(align_tp=2))
    pieces = [p for group in plan.bins for p in group if p.chunk is not None and p.chunk.cols is not None]
    source = HFCheckpoint(models["fp8"])
    direct = _chunk_reader(source)
    pool = BufferPool(dist_ckpt.PREFETCH_BYTES)
    for order in (pieces, pieces[::-1], pieces[1::2] + pieces[::2]):
        pooled = _chunk_reader(source, pool)
        planner = dist_ckpt.StreamingPlanner(pieces, pooled, lambda n: None, prefetch_bytes=4 * max(p.nbytes for p in pieces),
                                             readers=3, recycle=pool.give)
        with planner.prefetching():
            for piece in order:
                got = planner.resolve_data(piece.item)
                assert torch.equal(got, direct(piece.chunk).reshape(got.shape)), piece.item.index
            planner.done_with_last()
