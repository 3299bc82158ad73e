"""Run megatron-core on CPU with gloo (tests, the demo, and loading checks without a GPU).

megatron-core assumes CUDA in a few places; these patches make a tiny model build, run and load a
dist checkpoint on CPU. Nothing here is needed (or used) on a GPU machine. The gloo world itself is
set up by `converters.mcore.world`.
"""

from __future__ import annotations

import torch


def install_cpu_shim() -> None:
    """Patch torch.cuda and megatron-core for CPU; call before building any megatron module."""
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.is_available = lambda: False
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # PP>1 moves the shared embedding "to the GPU"
    from megatron.core.transformer import multi_latent_attention
    from megatron.core.transformer.moe import moe_utils

    multi_latent_attention.HAVE_TE = False
    moe_utils.te_general_gemm = None  # referenced by the fp32 router even when TE is absent


def local_core_attention():
    """DotProductAttention that accepts (and ignores) the k/v channel arguments MLA passes."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class CpuDotProductAttention(DotProductAttention):
        def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
            super().__init__(*args, **kwargs)
            if v_channels is not None:  # the context is reshaped to heads x v_head_dim
                self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    return CpuDotProductAttention
