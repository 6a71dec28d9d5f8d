"""The paged-layout interface on both cache layouts vLLM uses, on CPU tensors.

vLLM CPU's packed pages are written with vLLM's own ``cpu_attn_reshape_and_cache`` (whatever
order the ISA packs in); vLLM GPU's layout (``[num_blocks, Hkv, block_size, 2 * d]``, key then
value in each slot's row, NHD memory order) is built the way its FlashAttention/Triton backends
allocate it. Both must gather, compact and read back the same entries, and the Triton
two-segment kernel (interpreted here) must attend the GPU layout's compacted cache exactly as
the torch path does.
"""

from __future__ import annotations

import pytest
import torch

from vllm_kvevict.cache import plan_compaction
from vllm_kvevict.policies import KeptSet
from vllm_kvevict.vllm.backends.head_rows import attend_compacted
from vllm_kvevict.vllm.layouts import CpuPackedLayout, SplitHeadDimLayout
from vllm_kvevict.vllm.step import CompactRegion

BS, HKV, G, D = 32, 2, 3, 64


def _isa() -> str:
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(torch.float32, BS, D, "auto")


def cpu_cache(keys: torch.Tensor, values: torch.Tensor, table: torch.Tensor, num_blocks: int):
    """vLLM CPU's ``[num_blocks, Hkv, bs, 2d]`` cache holding ``keys/values [T, Hkv, d]`` at
    positions ``0..T-1`` through ``table``, written by vLLM's op; and its layout."""
    from vllm import _custom_ops as ops

    kv = torch.full((num_blocks, HKV, BS, 2 * D), float("nan"))
    key_cache, value_cache = kv.view(num_blocks, HKV, 2 * BS, D).chunk(2, dim=2)
    pos = torch.arange(keys.shape[0])
    slots = table[pos // BS].long() * BS + pos % BS
    ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slots, _isa(),
                                   k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    return kv, CpuPackedLayout(HKV, BS, D, _isa(), torch.float32)


def gpu_cache(keys: torch.Tensor, values: torch.Tensor, table: torch.Tensor, num_blocks: int):
    """vLLM GPU's cache: logical ``[num_blocks, Hkv, bs, 2d]`` over NHD memory ``[nb, bs, Hkv, 2d]``."""
    memory = torch.full((num_blocks, BS, HKV, 2 * D), float("nan"))
    kv = memory.permute(0, 2, 1, 3)  # the logical view vLLM hands the backend
    pos = torch.arange(keys.shape[0])
    block, slot = table[pos // BS].long(), pos % BS
    kv[block, :, slot, :D] = keys
    kv[block, :, slot, D:] = values
    return kv, SplitHeadDimLayout(HKV, BS, D)


LAYOUTS = {"cpu": cpu_cache, "gpu": gpu_cache}


def _kept(length: int, seed: int, layers: int = 2) -> KeptSet:
    """Per (layer, head) a random kept set, unequal across heads (as Ada-KV makes them)."""
    gen = torch.Generator().manual_seed(seed)
    indices = []
    for _ in range(layers):
        counts = torch.randint(length // 8, length // 3, (HKV,), generator=gen)
        indices.append([torch.randperm(length, generator=gen)[: int(c)].sort().values for c in counts])
    budgets = torch.tensor([[len(i) for i in row] for row in indices])
    return KeptSet(indices=indices, head_budgets=budgets, scores=[])


@pytest.mark.parametrize("make", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("length", [100, 96, 257])
def test_gather_compact_and_read_back(make, length):
    torch.manual_seed(length)
    keys, values = torch.randn(length, HKV, D), torch.randn(length, HKV, D)
    table = torch.randperm(40)[: -(-length // BS)] + 8  # positional blocks 8..47, shuffled
    kv, layout = make(keys, values, table, num_blocks=64)
    got_k, got_v = layout.gather(kv, table, length)
    assert torch.equal(got_k, keys.transpose(0, 1)) and torch.equal(got_v, values.transpose(0, 1))
    kept = _kept(length, seed=length)
    plan = plan_compaction(kept, [2, 5, 3, 60], BS, HKV)
    region = CompactRegion.from_plan(plan, length)
    for layer in range(kept.num_layers):
        layout.compact(kv, table, plan, layer)
        got_k, got_v = layout.read_region(kv, region.block[layer], region.plane[layer], region.slot[layer])
        assert torch.equal(got_k, torch.cat([keys[kept.indices[layer][g], g] for g in range(HKV)]))
        assert torch.equal(got_v, torch.cat([values[kept.indices[layer][g], g] for g in range(HKV)]))
    # sources untouched (prefix-cache content stays valid); tail reads are positional
    tail_k, tail_v = layout.read_tail(kv, table[(length - 5) // BS :], length - 5, length)
    assert torch.equal(tail_k, keys[length - 5 :]) and torch.equal(tail_v, values[length - 5 :])


@pytest.mark.parametrize("make", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_compaction_refuses_a_destination_that_is_a_source(make):
    keys = torch.randn(64, HKV, D)
    table = torch.tensor([4, 5])
    kv, layout = make(keys, keys, table, num_blocks=8)
    plan = plan_compaction(_kept(64, seed=1), [5], BS, HKV)
    with pytest.raises(ValueError, match="source"):
        layout.compact(kv, table, plan, 0)


def test_two_segment_attention_equals_masked_full_attention():
    """Attention over (kept prompt tokens of each head) + (tail, causal) == full attention with
    the evicted prompt tokens masked, head by head."""
    torch.manual_seed(0)
    prompt, total, n = 90, 97, 3  # 7 tokens after the prompt, the last 3 are queries
    keys, values = torch.randn(total, HKV, D), torch.randn(total, HKV, D)
    queries = torch.randn(n, HKV * G, D)
    kept = _kept(prompt, seed=3, layers=1)
    lens = kept.head_budgets[0]
    region_k = torch.cat([keys[kept.indices[0][g], g] for g in range(HKV)])
    region_v = torch.cat([values[kept.indices[0][g], g] for g in range(HKV)])
    qpos = torch.arange(total - n, total)
    got = attend_compacted(queries, qpos, region_k, region_v, lens, keys[prompt:], values[prompt:],
                           torch.arange(prompt, total), scale=0.125)
    for h in range(HKV * G):
        g = h // G
        visible = torch.zeros(n, total, dtype=torch.bool)
        visible[:, kept.indices[0][g]] = True
        visible[:, prompt:] = torch.arange(prompt, total)[None, :] <= qpos[:, None]
        logits = (queries[:, h] @ keys[:, g].T * 0.125).masked_fill(~visible, float("-inf"))
        want = torch.softmax(logits, -1) @ values[:, g]
        torch.testing.assert_close(got[:, h], want, rtol=1e-5, atol=1e-5)


def test_triton_decode_on_the_gpu_layout_equals_the_torch_path():
    """The two-segment Triton kernel (interpreted on CPU) reads vLLM GPU's cache through the
    layout's K/V views and the compact page table, and agrees with the torch path."""
    from vllm_kvevict.cache import page_table_tensor
    from vllm_kvevict.kernels import triton_paged_decode_attention

    torch.manual_seed(1)
    prompt, total = 96, 100  # 4 tokens decoded after compaction
    keys, values = torch.randn(total, HKV, D), torch.randn(total, HKV, D)
    table = torch.tensor([9, 10, 11, 12])  # positions 0..127
    kv, layout = gpu_cache(keys, values, table, num_blocks=16)
    kept = _kept(prompt, seed=5, layers=1)
    plan = plan_compaction(kept, [2, 3, 4], BS, HKV)
    layout.compact(kv, table, plan, 0)
    region = CompactRegion.from_plan(plan, prompt)
    query = torch.randn(1, HKV * G, D)
    region_k, region_v = layout.read_region(kv, region.block[0], region.plane[0], region.slot[0])
    tail_k, tail_v = layout.read_tail(kv, table[region.first_tail_block :], prompt, total)
    want = attend_compacted(query, torch.tensor([total - 1]), region_k, region_v, region.lens[0], tail_k, tail_v,
                            torch.arange(prompt, total), scale=0.125)
    pages, lens = page_table_tensor(plan)
    k_cache, v_cache = layout.key_value_views(kv)
    got = triton_paged_decode_attention(query, k_cache, v_cache, pages[0][None], lens[0][None], table[None].int(),
                                        torch.tensor([prompt], dtype=torch.int32),
                                        torch.tensor([total], dtype=torch.int32), scale=0.125)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("length", [1, 31, 100, 257])
def test_cpu_gather_reads_whole_pages_and_equals_the_entry_reads(length):
    """vLLM CPU's ``vec`` pages are affine (keys ``[d, bs]``, values ``[bs, d]``): gather copies
    whole pages and views them (issue 14), giving exactly the per-entry reads."""
    from vllm_kvevict.vllm.layouts.base import PagedLayout

    torch.manual_seed(length)
    keys, values = torch.randn(length, HKV, D), torch.randn(length, HKV, D)
    table = torch.randperm(40)[: -(-length // BS)] + 8
    kv, layout = cpu_cache(keys, values, table, num_blocks=64)
    assert layout.page_strides is not None
    fast, slow = layout.gather(kv, table, length), PagedLayout.gather(layout, kv, table, length)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
