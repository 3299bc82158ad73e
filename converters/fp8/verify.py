"""`--verify` for convert fp8-bf16: re-read the output and compare sampled blocks with the source."""

from __future__ import annotations

import random

import torch

from converters.fp8.plan import CastError, CastPlan, TensorJob
from converters.hf.checkpoint import row_range
from converters.hf.safetensors_io import read_tensor
from kernels.fp8 import dequant_fp8_blocks
from toolkit.safetensors_index import SafetensorsError, TensorInfo, read_header

_FULL_COMPARE_BYTES = 4 * 1024 * 1024


def _check_fp8(plan: CastPlan, job: TensorJob, output: TensorInfo, out_path, rng: random.Random) -> int:
    rows = job.source.shape[0]
    block_rows = plan.block[0]
    stripes = -(-rows // block_rows)
    chosen = sorted({0, stripes - 1, rng.randrange(stripes)})
    scale = read_tensor(job.scale_path, job.scale)
    blocks = 0
    for stripe in chosen:
        start, stop = stripe * block_rows, min(rows, (stripe + 1) * block_rows)
        expected = dequant_fp8_blocks(read_tensor(job.source_path, row_range(job.source, start, stop)), scale[stripe : stripe + 1], plan.block)
        actual = read_tensor(out_path, row_range(output, start, stop))
        if not torch.equal(expected.view(torch.int16), actual.view(torch.int16)):
            raise CastError(f"verify: {out_path.name}: {job.output.name} rows {start}-{stop} differ from the dequantised source")
        blocks += scale.shape[1]
    return blocks


def _check_copy(job: TensorJob, output: TensorInfo, out_path) -> None:
    if job.source.nbytes <= _FULL_COMPARE_BYTES or not job.source.shape:
        same = torch.equal(read_tensor(job.source_path, job.source).view(torch.uint8).flatten(), read_tensor(out_path, output).view(torch.uint8).flatten())
    else:
        stop = max(1, _FULL_COMPARE_BYTES // (job.source.nbytes // job.source.shape[0]))
        same = torch.equal(
            read_tensor(job.source_path, row_range(job.source, 0, stop)).view(torch.uint8),
            read_tensor(out_path, row_range(output, 0, stop)).view(torch.uint8),
        )
    if not same:
        raise CastError(f"verify: {out_path.name}: {job.output.name} is not byte-identical to the source")


def verify_cast(plan: CastPlan, seed: int = 0) -> dict[str, int]:
    """Check every output shard's tensor set, dtypes and shapes, sampled FP8 blocks and copied bytes."""
    rng = random.Random(seed)
    blocks = tensors = 0
    for shard in plan.shards:
        out_path = plan.dst / shard.name
        try:
            header = read_header(out_path)
        except SafetensorsError as exc:
            raise CastError(f"verify: {exc}") from exc
        expected = {job.output.name: job for job in shard.jobs}
        if set(header.tensors) != set(expected):
            missing = sorted(set(expected) - set(header.tensors))[:5]
            extra = sorted(set(header.tensors) - set(expected))[:5]
            raise CastError(f"verify: {out_path}: tensor set differs (missing {missing}, unexpected {extra})")
        if header.metadata.get("format") != "pt":
            raise CastError(f"verify: {out_path}: safetensors metadata lacks format=pt")
        for name, job in expected.items():
            output = header.tensors[name]
            if output.dtype != job.output.dtype or output.shape != job.output.shape:
                raise CastError(f"verify: {out_path.name}: {name} is {output.dtype}{list(output.shape)}, expected {job.output.dtype}{list(job.output.shape)}")
            if job.scale is not None:
                blocks += _check_fp8(plan, job, output, out_path, rng)
            else:
                _check_copy(job, output, out_path)
            tensors += 1
    return {"blocks_checked": blocks, "tensors_compared": tensors}
