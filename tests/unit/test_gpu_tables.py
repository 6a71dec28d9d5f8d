"""The GPU backends' per-step device tensors, on CPU tensors in the GPU cache layout.

* the block-table rewrite into the builder's persistent buffers equals the CPU backend's rewrite
  (:func:`vllm_kvevict.vllm.block_tables.rewrite`), upper bounds included, and reuses its buffers;
* a compacted request's page table read back from its ``CompactRegion`` is its plan's;
* the head rows' one-kernel decode (Triton interpreted, and the torch reference) gives what the
  CPU backend's torch path gives for every row, with several queries per row causal, and the
  page pool sends each region once.
"""

from __future__ import annotations

import pytest
import torch

from vllm_kvevict.cache import page_table_tensor, plan_compaction
from vllm_kvevict.policies import KeptSet
from vllm_kvevict.vllm import block_tables
from vllm_kvevict.vllm.backends.gpu_tables import StepTables
from vllm_kvevict.vllm.backends.head_batch import HeadRowBuffers, decode_head_rows, region_page_table
from vllm_kvevict.vllm.backends.head_rows import attend_row
from vllm_kvevict.vllm.layouts import SplitHeadDimLayout
from vllm_kvevict.vllm.step import CompactRegion, EvictionStep, HeadRow

BS, HKV, G, D, LAYERS = 16, 2, 4, 32, 2


def _common(table: torch.Tensor, lens: torch.Tensor):
    from vllm.v1.attention.backend import CommonAttentionMetadata

    n = table.shape[0]
    qsl = torch.arange(n + 1, dtype=torch.int32)
    return CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=lens.clone(), num_reqs=n, num_actual_tokens=n,
        max_query_len=1, max_seq_len=int(lens.max()), block_table_tensor=table.clone(),
        slot_mapping=torch.zeros(n, dtype=torch.long), seq_lens_cpu_upper_bound=lens.clone())


def test_rewrite_into_persistent_buffers_equals_the_cpu_rewrite_and_reuses_them(seed):
    gen = torch.Generator().manual_seed(seed)
    table = torch.randint(1, 500, (5, 12), generator=gen, dtype=torch.int32)
    lens = torch.tensor([150, 40, 190, 7, 100], dtype=torch.int32)
    cm = _common(table, lens)
    rows = {0: block_tables.page_row(table[0], 150, torch.tensor([2, 3, 5]), BS),
            2: block_tables.tail_row(table[2], 190, 8, BS),
            4: block_tables.page_row(table[4], 100, torch.tensor([0]), BS),
            9: block_tables.page_row(table[1], 40, torch.tensor([0]), BS)}  # past num_reqs: ignored
    tables = StepTables(torch.device("cpu"))
    ours, cpu = tables.rewrite(cm, rows), block_tables.rewrite(cm, rows)
    for r in range(5):
        used = -(-int(cpu.seq_lens[r]) // BS)  # what a kernel reads of the row
        assert torch.equal(ours.block_table_tensor[r, :used], cpu.block_table_tensor[r, :used]), r
    assert torch.equal(ours.seq_lens, cpu.seq_lens)
    assert torch.equal(ours.seq_lens_cpu_upper_bound, cpu.seq_lens_cpu_upper_bound)
    assert ours.max_seq_len == int(cpu.seq_lens.max()) == 150 - 3 * BS
    assert torch.equal(cm.block_table_tensor, table) and torch.equal(cm.seq_lens, lens)  # input untouched
    pointer = ours.block_table_tensor.data_ptr()
    again = tables.rewrite(_common(table, lens), {1: block_tables.tail_row(table[1], 40, 1, BS)})
    assert again.block_table_tensor.data_ptr() == pointer  # the same persistent buffer
    assert again.block_table_tensor[1, 0] == table[1, 1] and again.seq_lens.tolist()[1] == 40 - BS
    assert tables.rewrite(cm, {}) is cm


def _kept(length: int, gen: torch.Generator, most: int) -> KeptSet:
    """Random kept sets of 1 .. min(length / 2, most) tokens per head."""
    indices = []
    for _ in range(LAYERS):
        counts = torch.randint(1, min(length // 2, most + 1), (HKV,), generator=gen)
        indices.append([torch.randperm(length, generator=gen)[: int(c)].sort().values for c in counts])
    return KeptSet(indices=indices, head_budgets=torch.tensor([[len(i) for i in r] for r in indices]), scores=[])


def _request(gen, cache, layout, prompt_len: int, seq_len: int, compact_blocks: list[int], first_block: int):
    """Positional blocks ``first_block ..`` holding random K/V for ``seq_len`` positions, and a
    compaction of the prompt into ``compact_blocks``: ``(block ids, CompactRegion)``."""
    blocks = torch.arange(first_block, first_block + -(-seq_len // BS))
    pos = torch.arange(seq_len)
    for layer in range(LAYERS):
        cache[layer][blocks[pos // BS], :, pos % BS] = torch.randn(seq_len, HKV, 2 * D, generator=gen)
    # at most as many tokens per head as the compact blocks' head-pages hold spread evenly
    # (more could overflow the region: CompactRegionOverflow, a random failure of the set-up)
    plan = plan_compaction(_kept(prompt_len, gen, len(compact_blocks) * BS), compact_blocks, BS, HKV)
    for layer in range(LAYERS):
        layout.compact(cache[layer], blocks, plan, layer)
    return blocks, plan, CompactRegion.from_plan(plan, prompt_len)


def test_page_table_read_back_from_the_region_is_the_plans(seed):
    gen = torch.Generator().manual_seed(seed)
    layout = SplitHeadDimLayout(HKV, BS, D)
    cache = [torch.zeros(64, BS, HKV, 2 * D).permute(0, 2, 1, 3) for _ in range(LAYERS)]
    _, plan, region = _request(gen, cache, layout, 150, 160, [40, 41, 42, 43, 44, 45], 1)
    pages, lens = region_page_table(region, HKV, BS)
    want_pages, want_lens = page_table_tensor(plan)
    assert torch.equal(lens, want_lens)
    for layer in range(LAYERS):
        for g in range(HKV):
            n = -(-int(lens[layer, g]) // BS)
            assert torch.equal(pages[layer, g, :n], want_pages[layer, g, :n])


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_head_rows_decode_in_one_call_equals_the_torch_path(impl, seed, monkeypatch):
    """Three compacted requests (one with 3 queries: causal) among plain rows, in NHD memory."""
    if impl == "torch":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    gen = torch.Generator().manual_seed(seed)
    layout = SplitHeadDimLayout(HKV, BS, D)
    cache = [torch.full((80, BS, HKV, 2 * D), float("nan")).permute(0, 2, 1, 3) for _ in range(LAYERS)]
    specs = [(150, 170, 1), (90, 95, 3), (200, 233, 1)]  # prompt, seq_len, queries
    heads, rows_tables, offset, first_block = {}, [], 0, 1
    for i, (prompt, seq_len, n) in enumerate(specs):
        compact = list(range(60 + 6 * i, 66 + 6 * i))
        blocks, _, region = _request(gen, cache, layout, prompt, seq_len, compact, first_block)
        first_block += blocks.numel()
        row = 2 * i + 1  # batch rows 1, 3, 5 are compacted; 0, 2, 4 are not
        offset += 2  # two query tokens of the plain row before it
        table_row = torch.zeros(20, dtype=torch.int32)
        table_row[: blocks.numel()] = blocks.to(torch.int32)
        table_row[: region.first_tail_block] = 0  # prompt blocks freed after the swap
        rows_tables.append((row, table_row))
        heads[row] = HeadRow(f"r{i}", region, offset, n, seq_len, blocks[region.first_tail_block:])
        offset += n
    table = torch.zeros(6, 20, dtype=torch.int32)
    for row, table_row in rows_tables:
        table[row] = table_row
    step = EvictionStep(observe={}, head_rows=heads, table_rows={}, model=None)
    buffers = HeadRowBuffers(torch.device("cpu"))
    tensors = buffers.prepare(step, table, HKV, BS)
    query = torch.randn(offset, HKV * G * D, generator=gen)
    for layer in range(LAYERS):
        output = torch.full((offset, HKV * G * D), 7.0)
        decode_head_rows(tensors, layer, query, cache[layer], layout, output, HKV * G, D ** -0.5)
        out = output.view(offset, HKV * G, D)
        for head in heads.values():
            want = attend_row(head, layer, query.view(offset, HKV * G, D), cache[layer], layout, D ** -0.5)
            got = out[head.query_offset : head.query_offset + head.num_queries]
            assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (layer, head.req_id)
        untouched = torch.ones(offset, dtype=torch.bool)
        untouched[tensors.query_index] = False
        assert bool((out[untouched] == 7.0).all())  # other rows keep the stock kernel's output
    pool_pages = buffers.pool.pages
    assert buffers.prepare(step, table, HKV, BS) is not None and buffers.pool.pages is pool_pages  # sent once
