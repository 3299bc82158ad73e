"""One host's torch.distributed world for megatron-core: NCCL on GPUs, or gloo on CPU with the shim.

Used by `convert check`, the tests and the benches. It sits below both `check` and `shim`, so that the
shim (CPU patches only) never imports the checker that builds models on it.
"""

from __future__ import annotations

import os
import socket

import torch

from converters.mcore.shim import install_cpu_shim

# Multi-GPU hosts shared with others: never use NVLink multicast.
NCCL_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for MASTER_PORT)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def init_world(rank: int, world: int, port: int, te: bool) -> None:
    """This process's place in a world on 127.0.0.1: NCCL on GPU `rank`, or gloo with the CPU shim."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **NCCL_SAFE_ENV)
    if te:
        torch.cuda.set_device(rank)
        torch.distributed.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
        return
    install_cpu_shim()
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)


def init_layout(tp: int, pp: int, ep: int, te: bool) -> None:
    """Megatron's model-parallel groups and RNG for one layout (again after another layout's)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep)
    model_parallel_cuda_manual_seed(1234, **({} if te else {"inference_rng_tracker": True, "force_reset_rng": True}))


def init_distributed(rank: int, world_size: int, port: int, tp: int = 1, pp: int = 1, ep: int = 1) -> None:
    """gloo process group on 127.0.0.1 and megatron's model-parallel groups."""
    init_world(rank, world_size, port, te=False)
    init_layout(tp, pp, ep, te=False)
