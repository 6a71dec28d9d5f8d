"""Worker-side eviction logic: row plans, page choice, compacted block tables (pure torch)."""

from __future__ import annotations

import math

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.vllm.worker import (
    WorkerEvictionState,
    choose_evicted_blocks,
    compact_block_table,
    linear_weight,
    resolve_request_config,
)

SNAP = EvictionConfig(scorer="snapkv", budget=0.25, window=8)


def test_resolve_request_config_leaves_untouched_requests_alone():
    assert resolve_request_config(None, EvictionConfig()) is None
    assert resolve_request_config({"kv_eviction": "none"}, SNAP) is None
    assert resolve_request_config({"kv_budget": 1.0}, SNAP) is None
    assert resolve_request_config({"kv_granularity": "head"}, SNAP).resolved_granularity == "head"
    # A bad value never raises into the engine: the request is left whole.
    assert resolve_request_config({"kv_budget": 7.5}, SNAP) is None
    assert resolve_request_config({"kv_bogus": 1}, SNAP) is None
    cfg = resolve_request_config({"kv_eviction": "knorm", "kv_budget": 0.1, "other": "x"}, SNAP)
    assert cfg.scorer == "knorm" and cfg.budget == 0.1 and cfg.window == 8


def test_compact_block_table_drops_evicted_blocks_and_shortens_rows():
    table = torch.tensor([[10, 11, 12, 13, 14, 0], [20, 21, 22, 0, 0, 0]], dtype=torch.int32)
    lens = torch.tensor([70, 40], dtype=torch.int32)  # block size 16: row 0 uses 5 blocks
    new_table, new_lens = compact_block_table(table, lens, {0: torch.tensor([1, 2])}, 16)
    assert new_table[0, :3].tolist() == [10, 13, 14]
    assert new_lens.tolist() == [70 - 32, 40]
    assert torch.equal(new_table[1], table[1])
    assert table[0].tolist() == [10, 11, 12, 13, 14, 0]  # inputs untouched


def test_compacted_attention_equals_masked_attention():
    """Attention over the compacted table == attention over the full one with evicted slots masked."""
    torch.manual_seed(0)
    bs, hkv, d, length = 4, 2, 8, 22
    cache_k, cache_v = torch.randn(16, hkv, bs, d), torch.randn(16, hkv, bs, d)
    row = torch.tensor([[3, 9, 1, 12, 5, 7, 0, 0]], dtype=torch.int32)
    evicted = torch.tensor([1, 3])
    query = torch.randn(hkv, d)

    def attend(table, seq_len, mask=None):
        ids = table[0, : math.ceil(seq_len / bs)].long()
        k = cache_k[ids].transpose(0, 1).reshape(hkv, -1, d)[:, :seq_len]
        v = cache_v[ids].transpose(0, 1).reshape(hkv, -1, d)[:, :seq_len]
        logits = torch.einsum("hd,hld->hl", query, k)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        return torch.einsum("hl,hld->hd", logits.softmax(-1), v)

    mask = torch.ones(length, dtype=torch.bool)
    for b in evicted.tolist():
        mask[b * bs : (b + 1) * bs] = False
    table, lens = compact_block_table(row, torch.tensor([length], dtype=torch.int32), {0: evicted}, bs)
    torch.testing.assert_close(attend(table, int(lens[0])), attend(row, length, mask))


def test_choose_evicted_blocks_keeps_budget_window_and_last_block():
    torch.manual_seed(1)
    length, bs = 203, 16  # 13 blocks, last partial
    scores = [torch.rand(2, length) for _ in range(3)]
    config = EvictionConfig(scorer="snapkv", budget=0.25, window=16)
    evicted = choose_evicted_blocks(scores, length, bs, config)
    kept = sorted(set(range(13)) - set(evicted))
    assert 12 in kept and 11 in kept  # the last block, and the window (tokens 187..202)
    assert len(kept) <= math.ceil(0.25 * 13) + 2
    assert all(b < 12 for b in evicted) and evicted == sorted(evicted)


PAGE_ARGS = {"kv_eviction": "snapkv", "kv_budget": 0.25, "kv_window": 8, "kv_granularity": "page"}


def _plan(state, row, req_id, computed, q_len, prompt_len=100, args=PAGE_ARGS):
    state.plan_row(row, req_id, args, prompt_len, computed, q_len)


def test_row_plans_follow_chunks_window_and_eviction():
    state = WorkerEvictionState()
    state.begin_step(())
    _plan(state, 0, "a", computed=0, q_len=64)  # chunk ends before the window (92..99)
    _plan(state, 1, "b", computed=0, q_len=96)  # chunk holds window rows 92..95
    _plan(state, 2, "c", computed=96, q_len=4)  # last chunk: rows 96..99, scores
    assert 0 not in state.rows
    assert (state.rows[1].window_lo, state.rows[1].window_hi, state.rows[1].score) == (92, 96, False)
    assert (state.rows[2].window_lo, state.rows[2].window_hi, state.rows[2].score) == (0, 4, True)
    # stash window queries as the backend would: b's 4 rows, then c's (c alone has a window here)
    state.record_window("L.attn", 1, torch.ones(4, 2, 8))
    state.record_window("L.attn", 2, torch.zeros(4, 2, 8))
    assert state.window_of("L.attn", 2).shape == (2, 4, 8)
    state.num_layers, state.block_size = 1, 16
    state.record_scores(2, 0, torch.rand(1, 100))
    evicted = state.finish_step()
    assert set(evicted) == {"c"} and len(evicted["c"]) > 0
    policy, seconds = state.last_evictions["c"]  # what the connector reports for the metrics
    assert policy == "snapkv" and seconds >= 0.0
    # next step: c attends compacted, a and b continue their prefill; a preemption resets c
    state.begin_step(())
    _plan(state, 0, "c", computed=101, q_len=1)
    assert torch.equal(state.compact_rows[0], torch.tensor(evicted["c"]))
    assert state.finish_step() == {}
    state.begin_step({"c"})
    _plan(state, 0, "c", computed=0, q_len=100)
    assert 0 not in state.compact_rows and state.rows[0].score


def test_missing_layer_scores_leave_request_whole():
    state = WorkerEvictionState()
    state.begin_step(())
    _plan(state, 0, "a", computed=0, q_len=100)
    state.num_layers, state.block_size = 2, 16
    state.record_scores(0, 0, torch.rand(1, 100))  # layer 1 never scored
    assert state.finish_step() == {"a": []}
    assert state.num_failed == 1


def test_linear_weight_recovers_a_repacked_weight():
    """vLLM's CPU linear layers drop ``weight`` after packing; the GEMM on I gives it back."""

    class Repacked(torch.nn.Module):
        def __init__(self, w):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
            self.input_size_per_partition = w.shape[1]
            self.quant_method = type("M", (), {"apply": staticmethod(lambda layer, x, bias: x @ w.t())})()

    w = torch.randn(6, 4)
    torch.testing.assert_close(linear_weight(Repacked(w)), w)
    plain = torch.nn.Linear(4, 6, bias=False)
    torch.testing.assert_close(linear_weight(plain), plain.weight.detach())
