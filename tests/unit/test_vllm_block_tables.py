"""Block-table rows as vLLM's kernel sees them after eviction, and their rewrite into the metadata."""

from __future__ import annotations

import torch

from vllm_kvevict.vllm.block_tables import page_row, rewrite, tail_row


def test_page_row_drops_evicted_blocks_and_shortens_the_row():
    ids = torch.tensor([10, 11, 12, 13, 14, 0, 0], dtype=torch.int32)
    row = page_row(ids, 70, torch.tensor([1, 2]), 16)  # 70 tokens: 5 blocks, the last partial
    assert row.block_ids.tolist() == [10, 13, 14] and row.seq_len == 70 - 32
    assert page_row(ids, 70, torch.tensor([], dtype=torch.long), 16).block_ids.tolist() == [10, 11, 12, 13, 14]


def test_tail_row_keeps_the_tail_only():
    ids = torch.tensor([10, 11, 12, 13, 14, 0], dtype=torch.int32)
    row = tail_row(ids, 70, first_tail_block=4, block_size=16)
    assert row.block_ids.tolist() == [14] and row.seq_len == 6


def test_rewrite_changes_only_the_named_rows_of_a_copy():
    from vllm.v1.attention.backend import CommonAttentionMetadata

    table = torch.arange(12, dtype=torch.int32).view(3, 4) + 1
    lens = torch.tensor([64, 50, 30], dtype=torch.int32)
    qsl = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    cm = CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=lens, num_reqs=3, num_actual_tokens=3,
        max_query_len=1, max_seq_len=64, block_table_tensor=table, slot_mapping=torch.zeros(3, dtype=torch.long),
        seq_lens_cpu_upper_bound=lens.clone(),
    )
    out = rewrite(cm, {0: page_row(table[0], 64, torch.tensor([1, 2]), 16), 2: tail_row(table[2], 30, 1, 16)})
    assert out.block_table_tensor.tolist() == [[1, 4, 0, 0], [5, 6, 7, 8], [10, 0, 0, 0]]
    assert out.seq_lens.tolist() == [32, 50, 14] and out.seq_lens_cpu_upper_bound.tolist() == [32, 50, 14]
    assert out.max_seq_len == 50
    assert table[0].tolist() == [1, 2, 3, 4] and lens.tolist() == [64, 50, 30]  # the input is untouched
    assert rewrite(cm, {}) is cm
