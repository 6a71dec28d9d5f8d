"""Our CPU backend's pieces: reading keys back from vLLM's packed CPU KV pages."""

from __future__ import annotations

import pytest
import torch

from vllm_kvevict.vllm.backend import KVEvictCPUBackend, block_layout, layer_index


@pytest.mark.parametrize("block_size,head_dim", [(32, 32), (32, 64), (64, 32)])
def test_block_layout_reads_back_what_the_kernel_wrote(block_size, head_dim):
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(torch.float32, block_size, head_dim, "auto")
    torch.manual_seed(0)
    heads, blocks = 2, 3
    cache = torch.zeros(blocks, heads, block_size, 2 * head_dim)
    key_cache, value_cache = cache.view(blocks, heads, block_size * 2, head_dim).chunk(2, dim=2)
    keys, values = torch.randn(block_size, heads, head_dim), torch.randn(block_size, heads, head_dim)
    ops.cpu_attn_reshape_and_cache(
        keys, values, key_cache, value_cache, torch.arange(block_size) + block_size, isa,
        k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto",
    )
    key_index, value_index = block_layout(isa, block_size, head_dim, torch.float32)
    got_k = key_cache[1].reshape(heads, -1)[:, key_index].view(heads, block_size, head_dim)
    got_v = value_cache[1].reshape(heads, -1)[:, value_index].view(heads, block_size, head_dim)
    torch.testing.assert_close(got_k, keys.transpose(0, 1))
    torch.testing.assert_close(got_v, values.transpose(0, 1))


def test_backend_keeps_cpu_attn_identity():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    assert issubclass(KVEvictCPUBackend, CPUAttentionBackend)
    assert KVEvictCPUBackend.get_name() == "CPU_ATTN"  # vLLM's CPU-specific checks still apply
    assert layer_index("model.layers.17.self_attn.attn") == 17
