"""What each rank reads when Megatron-Core loads a torch_dist checkpoint, planned from `.metadata` alone.

torch DCP's `FileSystemReader.read_data` reads every stored chunk that overlaps a requested slice whole
(once per request it overlaps), then narrows it in memory; megatron-core's default load (and verl's
`load_mcore_dist_weights`) reads on every rank, with no deduplication across ranks. So the bytes a
cluster reads depend on the chunk layout as much as on the model.

`rank_requests()` + `cluster_read()` compute it without loading anything: the slices each rank asks for
come from the mapping table and `converters.mcore.tp_layout.SHARDING` (tests check them against the real
model's `sharded_state_dict`), and the chunks they overlap from a checkpoint's `.metadata`. The measured
counterpart, a real load with every byte counted, is `bench/load_reads.py`.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any

from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata

from converters.mcore.mapping import MappingPlan
from converters.mcore.tp_layout import REPLICATED, sharding_of, source_extents


@dataclass(frozen=True)
class ParallelLayout:
    """Megatron's parallel sizes; ranks are numbered in its default order (TP fastest, PP slowest)."""

    world: int
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None  # None: TP, Megatron's default
    cp: int = 1
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.cp * self.pp)

    @property
    def expert_dp(self) -> int:
        return self.world // (self.expert_tp * self.ep * self.pp)

    def coordinates(self, rank: int) -> dict[str, int]:
        """tp, cp, dp, pp (dense decomposition 'tp-cp-dp-pp') and etp, ep, edp (experts, 'etp-ep-dp-pp')."""
        per_stage = self.world // self.pp
        pp, inner = divmod(rank, per_stage)
        tp, rest = inner % self.tp, inner // self.tp
        cp, dp = rest % self.cp, rest // self.cp
        etp, rest = inner % self.expert_tp, inner // self.expert_tp
        ep, edp = rest % self.ep, rest // self.ep
        return {"tp": tp, "cp": cp, "dp": dp, "pp": pp, "etp": etp, "ep": ep, "edp": edp}


def layer_stages(layers: int, layout: ParallelLayout) -> list[int]:
    """The pipeline stage of every decoder layer (first/last stage sizes as given, the rest even)."""
    first, last, pp = layout.first_stage_layers, layout.last_stage_layers, layout.pp
    if pp == 1:
        return [0] * layers
    middle_stages = pp - (first is not None) - (last is not None)
    middle = (layers - (first or 0) - (last or 0)) // max(middle_stages, 1)
    sizes = [first if first is not None else middle] + [middle] * (pp - 2) + [last if last is not None else middle]
    sizes[-1] = layers - sum(sizes[:-1])
    return [stage for stage, size in enumerate(sizes) for _ in range(size)]


@dataclass(frozen=True)
class Request:
    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


def _stages_of(key: str, stages: list[int], pp: int, has_mtp: bool) -> set[int]:
    if key.startswith("decoder.layers."):
        return {stages[int(key.split(".")[2])]}
    if key.startswith("embedding."):  # the MTP stage keeps a tied copy of the embedding
        return {0, pp - 1} if has_mtp else {0}
    return {pp - 1}  # output_layer, decoder.final_layernorm, mtp.*


def rank_requests(mapping: MappingPlan, layout: ParallelLayout, rank: int, duplicated_down_proj: bool = False) -> list[Request]:
    """Every tensor slice `rank` asks for at load (megatron-core 0.16.1, no singleton_local_shards).

    `mapping` is the global plan (converters.mcore.mapping.plan_mapping); its chunk sources tell the
    SwiGLU halves apart. `duplicated_down_proj`: the unpatched TE spec, whose MLA down projections are
    whole on every rank (the local spec and the patched TE spec split them like column-parallel ones).
    """
    where = layout.coordinates(rank)
    layers = 1 + max((int(t.key.split(".")[2]) for t in mapping.tensors if t.key.startswith("decoder.layers.")), default=-1)
    stages = layer_stages(layers, layout)
    has_mtp = any(t.key.startswith("mtp.") for t in mapping.tensors)
    requests: list[Request] = []
    for tensor in mapping.tensors:
        if where["pp"] not in _stages_of(tensor.key, stages, layout.pp, has_mtp):
            continue
        sharding = sharding_of(tensor.key, len(tensor.shape))
        if sharding.kind == REPLICATED or (duplicated_down_proj and "_down_proj." in tensor.key):
            requests.append(Request(tensor.key, (0,) * len(tensor.shape), tensor.shape))
            continue
        parts, part = (layout.expert_tp, where["etp"]) if sharding.expert else (layout.tp, where["tp"])
        axis = sharding.axis
        if sharding.expert:
            local = tensor.shape[0] // layout.ep
            experts = range(where["ep"] * local, (where["ep"] + 1) * local)
            template = [c for c in tensor.chunks if c.offsets[0] == 0]
        else:
            experts, template = [None], tensor.chunks
        segments = sorted(set(source_extents(template, axis).values()))
        for expert in experts:
            for low, high in segments:
                step = -(-(high - low) // parts)
                start, stop = low + min(high - low, part * step), low + min(high - low, (part + 1) * step)
                if start >= stop:
                    continue
                offsets, sizes = [0] * len(tensor.shape), list(tensor.shape)
                offsets[axis], sizes[axis] = start, stop - start
                if expert is not None:
                    offsets[0], sizes[0] = expert, 1
                requests.append(Request(tensor.key, tuple(offsets), tuple(sizes)))
    return requests


@dataclass
class _KeyIndex:
    starts: list[int]
    chunks: list[Any]
    longest: int


@dataclass
class ReadPlan:
    """Bytes a set of ranks read for their requests: stored records read whole, and the parts they need."""

    record_bytes: int = 0
    needed_bytes: int = 0
    missing: list[str] = field(default_factory=list)


class ChunkIndex:
    """A checkpoint's `.metadata` indexed for overlap queries (by the first dim of each tensor's chunks)."""

    def __init__(self, metadata: Metadata) -> None:
        self.metadata = metadata
        self.keys: dict[str, _KeyIndex] = {}
        for key, meta in metadata.state_dict_metadata.items():
            if isinstance(meta, TensorStorageMetadata):
                chunks = sorted(meta.chunks, key=lambda c: tuple(c.offsets))
                starts = [int(c.offsets[0]) if len(c.offsets) else 0 for c in chunks]
                longest = max((int(c.sizes[0]) if len(c.sizes) else 1 for c in chunks), default=0)
                self.keys[key] = _KeyIndex(starts, chunks, longest)

    def record_length(self, key: str, chunk) -> int:
        """The stored record's length (from storage_data; a planned layout without it: the payload)."""
        info = self.metadata.storage_data.get(MetadataIndex(key, chunk.offsets)) if self.metadata.storage_data else None
        if info is not None:
            return info.length
        return math.prod(chunk.sizes) * self.metadata.state_dict_metadata[key].properties.dtype.itemsize

    def plan(self, requests: list[Request]) -> ReadPlan:
        result = ReadPlan()
        for request in requests:
            index = self.keys.get(request.key)
            if index is None:
                result.missing.append(request.key)
                continue
            itemsize = self.metadata.state_dict_metadata[request.key].properties.dtype.itemsize
            low, high = request.offsets[0], request.offsets[0] + request.sizes[0]
            first = bisect.bisect_left(index.starts, low - index.longest + 1)
            for position in range(first, bisect.bisect_left(index.starts, high)):
                chunk = index.chunks[position]
                overlap = 1
                for a, s, b, t in zip(request.offsets, request.sizes, chunk.offsets, chunk.sizes, strict=True):
                    overlap *= max(0, min(a + s, b + t) - max(a, b))
                if overlap:
                    result.record_bytes += self.record_length(request.key, chunk)
                    result.needed_bytes += overlap * itemsize
        return result


def checkpoint_tensor_bytes(metadata: Metadata) -> int:
    """Payload bytes of every tensor stored (each element once)."""
    return sum(math.prod(meta.size) * meta.properties.dtype.itemsize for meta in metadata.state_dict_metadata.values()
               if isinstance(meta, TensorStorageMetadata))


@dataclass
class ClusterRead:
    """What a whole cluster reads to load one checkpoint (every rank, no deduplication)."""

    checkpoint_bytes: int
    needed_bytes: int  # summed over ranks: the slices they keep
    read_bytes: int  # summed over ranks: the stored records they read whole
    per_rank: list[int]
    per_node: list[int]
    missing: list[str]

    @property
    def over_checkpoint(self) -> float:
        return self.read_bytes / self.checkpoint_bytes

    @property
    def over_needed(self) -> float:
        return self.read_bytes / self.needed_bytes


def cluster_read(metadata: Metadata, mapping: MappingPlan, layout: ParallelLayout, gpus_per_node: int = 8,
                 duplicated_down_proj: bool = False) -> ClusterRead:
    """Every rank's read plan against `metadata`; ranks fill nodes in order (rank // gpus_per_node)."""
    index = ChunkIndex(metadata)
    per_rank, needed, missing = [], 0, set()
    for rank in range(layout.world):
        plan = index.plan(rank_requests(mapping, layout, rank, duplicated_down_proj))
        per_rank.append(plan.record_bytes)
        needed += plan.needed_bytes
        missing.update(plan.missing)
    nodes = -(-layout.world // gpus_per_node)
    per_node = [sum(per_rank[n * gpus_per_node:(n + 1) * gpus_per_node]) for n in range(nodes)]
    return ClusterRead(checkpoint_tensor_bytes(metadata), needed, sum(per_rank), per_rank, per_node, sorted(missing))


def detect_alignment(metadata: Metadata) -> tuple[int, int]:
    """(TP, ETP) the checkpoint's chunks are cut for, read off `linear_proj` and a routed expert's
    `linear_fc2` (both split along their last dim); (1, 1) for a global layout."""
    def slices(suffix: str, expert: bool) -> int:
        key = next((k for k in metadata.state_dict_metadata if k.endswith(suffix)), None)
        if key is None:
            return 1
        chunks = metadata.state_dict_metadata[key].chunks
        return len({int(c.offsets[-1]) for c in chunks if not expert or int(c.offsets[0]) == 0})

    return slices("self_attention.linear_proj.weight", False), slices("mlp.experts.experts.linear_fc2.weight", True)
