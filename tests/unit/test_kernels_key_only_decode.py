"""The two-segment decode kernel with VECTOR's key-only tokens (Triton, interpreted on CPU), and its
torch reference (``KeyOnlySegment.gather``), against the CPU backend's torch path over the same
compacted cache (two keys to a slot, values rebuilt)."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_kvevict.cache import page_table_tensor, plan_compaction
from vllm_kvevict.kernels import torch_paged_decode_attention, triton_paged_decode_attention
from vllm_kvevict.kernels.key_only_decode import KeyOnlySegment
from vllm_kvevict.lkv.identity import ModelIdentity
from vllm_kvevict.policies import KeptSet
from vllm_kvevict.vector.artifact import VectorArtifact
from vllm_kvevict.vllm.backends.head_rows import attend_row
from vllm_kvevict.vllm.layouts import SplitHeadDimLayout
from vllm_kvevict.vllm.step import CompactRegion, HeadRow

pytest.importorskip("triton")

HKV, G, D, BS, NUM_BLOCKS = 2, 3, 64, 16, 96


def artifact(derotate: list[bool], seed: int) -> VectorArtifact:
    gen = torch.Generator().manual_seed(seed)
    identity = ModelIdentity("LlamaForCausalLM", 1, HKV * G, HKV, D, "kernel-test")
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    weight = torch.randn(1, HKV, D + 1, D, generator=gen) / math.sqrt(D)
    return VectorArtifact(identity, weight, torch.tensor([derotate]), torch.rand(1, HKV, 2, generator=gen), inv_freq,
                          rope_scaling=1.0)


def request(kv, layout, gen, prompt_len: int, seq_len: int, positional: list[int], compact: list[int],
            ko_counts: list[int], art: VectorArtifact):
    """Write positions ``0 .. seq_len - 1`` into ``positional`` blocks, compact a random VECTOR
    kept set of the prompt into ``compact`` blocks; returns ``(HeadRow, plan)``."""
    table = torch.tensor(positional)
    pos = torch.arange(seq_len)
    block, slot = table[pos // BS], pos % BS
    k_cache, v_cache = layout.key_value_views(kv)
    k_cache[block, :, slot] = torch.randn(seq_len, HKV, D, generator=gen)
    v_cache[block, :, slot] = torch.randn(seq_len, HKV, D, generator=gen)
    whole, key_only = [], []
    for g in range(HKV):
        order = torch.randperm(prompt_len, generator=gen)
        n_whole = int(torch.randint(1, min(prompt_len // 3, prompt_len - ko_counts[g]), (1,), generator=gen))
        whole.append(order[:n_whole].sort().values)
        key_only.append(order[n_whole : n_whole + ko_counts[g]].sort().values)
    budgets = torch.tensor([[w.numel() + k.numel() // 2 for w, k in zip(whole, key_only)]])
    plan = plan_compaction(KeptSet([whole], budgets, [], key_only=[key_only]), compact, BS, HKV)
    layout.compact(kv, table, plan, 0)
    region = CompactRegion.from_plan(plan, prompt_len, art)
    return HeadRow("r", region, 0, 1, seq_len, table[region.first_tail_block :]), plan, table


def padded(tensors: list[torch.Tensor], fill: int) -> torch.Tensor:
    width = max(max(t.shape[-1] for t in tensors), 1)
    return torch.stack([torch.nn.functional.pad(t, (0, width - t.shape[-1]), value=fill) for t in tensors])


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("derotate", [[True, False], [False, True]], ids=["rope-undone-head0", "rope-undone-head1"])
def test_triton_key_only_decode_equals_the_torch_path(splits, derotate, seed):
    gen = torch.Generator().manual_seed(seed)
    art = artifact(derotate, seed)
    kv = torch.zeros(NUM_BLOCKS, HKV, BS, 2 * D)
    layout = SplitHeadDimLayout(HKV, BS, D)
    # request 0: unequal key-only counts (one head none), tail from mid-block; request 1: 130 pairs
    rows = [request(kv, layout, gen, 150, 171, list(range(1, 12)), list(range(60, 72)), [0, 38], art),
            request(kv, layout, gen, 300, 305, list(range(20, 40)), list(range(72, 90)), [260, 6], art)]
    q = torch.randn(len(rows), HKV * G, D, generator=gen)
    want = torch.stack([attend_row(row, 0, q[b : b + 1], kv, layout, scale=0.125)[0] for b, (row, _, _) in
                        enumerate(rows)])
    pages, lens = zip(*(tuple(t[0] for t in page_table_tensor(plan)) for _, plan, _ in rows))
    ko_positions = []
    for _, plan, _ in rows:
        gather = plan.key_only.layer_gather(0)
        ko_positions.append(padded([gather.src_positions[gather.head == g] for g in range(HKV)], 0))
    segment = KeyOnlySegment(lens=torch.stack([plan.key_only.lens[0] for _, plan, _ in rows]),
                             positions=padded(ko_positions, 0), weight=art.weight[0], derotate=art.derotate[0],
                             inv_freq=art.inv_freq)
    k_cache, v_cache = layout.key_value_views(kv)
    got = triton_paged_decode_attention(
        q, k_cache, v_cache, padded(list(pages), -1), torch.stack(lens), padded([t for _, _, t in rows], 0),
        torch.tensor([row.region.tail_start for row, _, _ in rows]), torch.tensor([row.seq_len for row, _, _ in rows]),
        scale=0.125, num_splits=splits, key_only=segment)
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-5)
    reference = torch_paged_decode_attention(
        q, k_cache, v_cache, padded(list(pages), -1), torch.stack(lens), padded([t for _, _, t in rows], 0),
        torch.tensor([row.region.tail_start for row, _, _ in rows]), torch.tensor([row.seq_len for row, _, _ in rows]),
        scale=0.125, key_only=segment)
    torch.testing.assert_close(reference, want, rtol=2e-4, atol=2e-5)
    without = triton_paged_decode_attention(
        q, k_cache, v_cache, padded(list(pages), -1), torch.stack(lens), padded([t for _, _, t in rows], 0),
        torch.tensor([row.region.tail_start for row, _, _ in rows]), torch.tensor([row.seq_len for row, _, _ in rows]),
        scale=0.125, num_splits=splits)
    assert not torch.allclose(without, want, rtol=2e-4, atol=2e-5)  # the key-only tokens count
