"""Compacted rows through vLLM-CPU's own attention op on single-head pages (backends/cpu_head_pages).

The cache is written by vLLM's ``cpu_attn_reshape_and_cache`` and compacted by the plugin's
layout, the op is vLLM's ``cpu_attention_with_kv_cache``: its output for every (row, KV head)
sequence must equal the torch two-segment path's (to float32 rounding: another summation order),
and the regions it cannot attend exactly (a head missing the prompt's partial last page, single
tokens per head) must be left to the torch path.
"""

from __future__ import annotations

import pytest
import torch
from test_vllm_layouts import BS, D, G, HKV, _isa, cpu_cache

from vllm_kvevict.cache import plan_compaction
from vllm_kvevict.policies import KeptSet
from vllm_kvevict.vllm.backends import cpu_head_pages
from vllm_kvevict.vllm.backends.head_rows import attend_row
from vllm_kvevict.vllm.step import CompactRegion, HeadRow

LAYERS, SCALE = 2, 0.125


def whole_pages(prompt: int, seed: int, keep_last: bool = True) -> KeptSet:
    """Per (layer, head) a random set of the prompt's pages (at least one), as head_selection=page
    keeps them; ``keep_last``: every head keeps the prompt's last page."""
    gen = torch.Generator().manual_seed(seed)
    pages = -(-prompt // BS)
    indices = []
    for _ in range(LAYERS):
        heads = []
        for _ in range(HKV):
            chosen = torch.randperm(pages - 1, generator=gen)[: int(torch.randint(1, pages - 1, (1,), generator=gen))]
            chosen = chosen.tolist() + ([pages - 1] if keep_last else [])
            pos = torch.cat([torch.arange(p * BS, min((p + 1) * BS, prompt)) for p in sorted(chosen)])
            heads.append(pos)
        indices.append(heads)
    budgets = torch.tensor([[len(i) for i in row] for row in indices])
    return KeptSet(indices=indices, head_budgets=budgets, scores=[])


def single_tokens(prompt: int, seed: int) -> KeptSet:
    gen = torch.Generator().manual_seed(seed)
    indices = [[torch.randperm(prompt, generator=gen)[: prompt // 3].sort().values for _ in range(HKV)]
               for _ in range(LAYERS)]
    return KeptSet(indices=indices, head_budgets=torch.full((LAYERS, HKV), prompt // 3), scores=[])


def compacted(prompt: int, total: int, kept: KeptSet, table: torch.Tensor, compact: list[int], seed: int):
    """Per layer a cache holding ``total`` tokens at ``table``, the prompt compacted into ``compact``."""
    torch.manual_seed(seed)
    plan, caches = plan_compaction(kept, compact, BS, HKV), []
    for layer in range(LAYERS):
        keys, values = torch.randn(total, HKV, D), torch.randn(total, HKV, D)
        kv, layout = cpu_cache(keys, values, table, num_blocks=96)
        layout.compact(kv, table, plan, layer)
        caches.append(kv.nan_to_num_(0.0))  # vLLM's caches start zeroed; the op reads whole pages
    return caches, layout, CompactRegion.from_plan(plan, prompt)


def _metadata(seq_lens, query_start_loc):
    from vllm import _custom_ops as ops

    return ops.cpu_attn_get_scheduler_metadata(
        num_reqs=seq_lens.numel(), num_heads=G, num_kv_heads=1, head_dim=D, seq_lens=seq_lens, dtype=torch.float32,
        query_start_loc=query_start_loc, causal=True, sliding_window_size=-1, isa=_isa(), enable_kv_split=True)


@pytest.mark.parametrize("prompt", [96, 100])
def test_whole_page_regions_map_to_their_head_pages(prompt):
    kept = whole_pages(prompt, seed=prompt)
    table = torch.arange(10, 10 + -(-(prompt + 40) // BS))
    _, _, region = compacted(prompt, prompt + 40, kept, table, [2, 5, 3, 7], seed=1)
    pages = cpu_head_pages.region_pages(region, HKV, BS)
    assert pages is not None
    assert torch.equal(pages.count, kept.head_budgets // BS)
    for layer in range(LAYERS):
        ids = region.block[layer] * HKV + region.plane[layer]
        start = 0
        for g in range(HKV):
            full = int(pages.count[layer, g]) * BS
            assert pages.pages[layer, g, : pages.count[layer, g]].tolist() == ids[start : start + full : BS].tolist()
            start += int(kept.head_budgets[layer, g])


def test_regions_with_a_hole_are_left_to_the_torch_path():
    table = torch.arange(10, 14)
    # the prompt ends inside a block (100 = 3 * 32 + 4) and some head did not keep that page
    _, _, region = compacted(100, 120, whole_pages(100, seed=3, keep_last=False), table, [2, 5, 3, 7], seed=2)
    assert cpu_head_pages.region_pages(region, HKV, BS) is None
    _, _, region = compacted(100, 120, single_tokens(100, seed=4), table, [2, 5, 3, 7], seed=3)
    assert cpu_head_pages.region_pages(region, HKV, BS) is None
    # a region built without its source positions is never taken for whole pages
    _, _, region = compacted(100, 120, whole_pages(100, seed=3), table, [2, 5, 3, 7], seed=2)
    region.positions = []
    assert cpu_head_pages.region_pages(region, HKV, BS) is None


@pytest.mark.parametrize("prompt", [96, 100, 250])
def test_stock_op_on_single_head_pages_equals_the_torch_path(prompt):
    """Three compacted rows in one batch around an ordinary row: decode (one query), three queries
    (causal inside the tail), and a tail of one token; every layer, every query head."""
    from vllm import _custom_ops as ops

    specs = [(prompt + 37, 1), (prompt + 9, 3), (prompt + 1, 1)]  # (seq_len, num_queries)
    rows, offset, kv = {}, 0, None
    for r, (total, n) in enumerate(specs):
        table = torch.arange(10 + 12 * r, 10 + 12 * r + -(-total // BS))
        compact = list(range(50 + 15 * r, 58 + 15 * r))
        caches, layout, region = compacted(prompt, total, whole_pages(prompt, seed=prompt + r), table, compact, r)
        if kv is None:
            kv = caches
        used = torch.cat([table, torch.tensor(compact)])
        for layer in range(LAYERS):  # every row's blocks are its own: one cache per layer holds them all
            kv[layer][used] = caches[layer][used]
        offset += 2 if r == 1 else 0  # batch row 1 is an ordinary request's two tokens
        rows[2 * r] = HeadRow(f"req-{r}", region, offset, n, total, table[region.first_tail_block :])
        offset += n
    batch = cpu_head_pages.prepare(rows, cpu_head_pages.RegionPagesCache(HKV, BS), _metadata)
    assert batch is not None and batch.batch_rows == (0, 2, 4)
    query = torch.randn(offset, HKV * G * D)
    for layer in range(LAYERS):
        output = torch.full((offset, HKV * G * D), 7.0)
        cpu_head_pages.attend_head_pages(batch, layer, query, kv[layer], output, HKV * G, SCALE,
                                         ops.cpu_attention_with_kv_cache)
        for row in rows.values():
            want = attend_row(row, layer, query.view(offset, HKV * G, D), kv[layer], layout, SCALE)
            got = output[row.query_offset : row.query_offset + row.num_queries].view(-1, HKV * G, D)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(output[1:3], torch.full((2, HKV * G * D), 7.0))  # the ordinary row untouched


def test_short_tail_row_covers_the_queries_with_the_last_blocks():
    region = CompactRegion([], [], [], torch.zeros(1, HKV, dtype=torch.int64), 100, 3)
    row = HeadRow("r", region, 0, 1, 170, torch.tensor([40, 41, 42, 43]))  # tail: positions 96..169
    short = cpu_head_pages.short_tail_row(row, BS)
    assert short.block_ids.tolist() == [42] and short.seq_len == 170 - 96 - 64
    row = HeadRow("r", region, 0, 12, 170, torch.tensor([40, 41, 42, 43]))  # 12 queries: 158..169
    short = cpu_head_pages.short_tail_row(row, BS)
    assert short.block_ids.tolist() == [41, 42] and short.seq_len == 170 - 96 - 32
