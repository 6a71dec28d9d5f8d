"""Head granularity on vLLM's packed CPU cache: compaction, region reads, two-segment attention,
and the worker's scored -> ordered -> compacted lifecycle.

The cache is written with vLLM's own ``cpu_attn_reshape_and_cache`` (whatever packed layout the
ISA uses), then compacted with :mod:`vllm_kvevict.vllm.head_pages` and read back.
"""

from __future__ import annotations

import pytest
import torch

from vllm_kvevict.cache import plan_compaction
from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies import plan_kept
from vllm_kvevict.vllm.backend import packed_pages
from vllm_kvevict.vllm.head_pages import (
    CompactRegion,
    attend_compacted,
    compact_layer,
    read_region,
    read_tail,
)
from vllm_kvevict.vllm.worker import WorkerEvictionState

BS, HKV, G, D = 32, 2, 3, 64


def _packed_cache(keys: torch.Tensor, values: torch.Tensor, table: torch.Tensor, num_blocks: int):
    """A ``[num_blocks, Hkv, bs, 2d]`` cache holding ``keys/values [T, Hkv, d]`` at positions
    ``0..T-1`` through ``table``, written by vLLM's op; and the layout's :class:`PackedPages`."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(torch.float32, BS, D, "auto")
    kv = torch.full((num_blocks, HKV, BS, 2 * D), float("nan"))
    key_cache, value_cache = kv.view(num_blocks, HKV, 2 * BS, D).chunk(2, dim=2)
    pos = torch.arange(keys.shape[0])
    slots = table[pos // BS].long() * BS + pos % BS
    ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slots, isa,
                                   k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    pages = packed_pages(isa, BS, D, torch.float32)
    return kv, pages


def _kept(length: int, budget: float, seed: int, layers: int = 2):
    gen = torch.Generator().manual_seed(seed)
    scores = [torch.rand(HKV, length, generator=gen) for _ in range(layers)]
    return plan_kept(scores, EvictionConfig(scorer="snapkv", budget=budget, window=8), length)


@pytest.mark.parametrize("length", [100, 96, 257])
def test_compaction_moves_each_heads_kept_tokens_into_its_head_pages(length):
    torch.manual_seed(length)
    keys, values = torch.randn(length, HKV, D), torch.randn(length, HKV, D)
    table = torch.randperm(40)[: -(-length // BS)] + 8  # positional blocks 8..47, shuffled
    kv, pages = _packed_cache(keys, values, table, num_blocks=64)
    kept = _kept(length, 0.3, seed=length)
    plan = plan_compaction(kept, [2, 5, 3, 60], BS, HKV)
    region = CompactRegion.from_plan(plan, length)
    for layer in range(kept.num_layers):
        compact_layer(kv, pages, table, plan.layer_gather(layer))
        got_k, got_v = read_region(kv, pages, region, layer)
        want_k = torch.cat([keys[kept.indices[layer][g], g] for g in range(HKV)])
        want_v = torch.cat([values[kept.indices[layer][g], g] for g in range(HKV)])
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    # sources untouched (prefix-cache content stays valid); tail reads are positional
    tail_k, tail_v = read_tail(kv, pages, table[(length - 5) // BS :], length - 5, length)
    assert torch.equal(tail_k, keys[length - 5 :]) and torch.equal(tail_v, values[length - 5 :])


def test_compaction_refuses_a_destination_that_is_a_source():
    keys = torch.randn(64, HKV, D)
    table = torch.tensor([4, 5])
    kv, pages = _packed_cache(keys, keys, table, num_blocks=8)
    plan = plan_compaction(_kept(64, 0.3, seed=1), [5], BS, HKV)
    with pytest.raises(ValueError, match="source"):
        compact_layer(kv, pages, table, plan.layer_gather(0))


def test_two_segment_attention_equals_masked_full_attention():
    """Attention over (kept prompt tokens of each head) + (tail, causal) == full attention with
    the evicted prompt tokens masked, head by head."""
    torch.manual_seed(0)
    prompt, total, n = 90, 97, 3  # 7 tokens after the prompt, the last 3 are queries
    keys, values = torch.randn(total, HKV, D), torch.randn(total, HKV, D)
    queries = torch.randn(n, HKV * G, D)
    kept = _kept(prompt, 0.25, seed=3, layers=1)
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


HEAD_ARGS = {"kv_eviction": "snapkv", "kv_budget": 0.25, "kv_window": 8}
PROMPT = 320


def _scoring_step(order: bool, layers: int = 2, prompt_len: int = PROMPT, fail_copy: bool = False):
    """One worker step that completes a head-granular prompt, with the KV caches and positional
    blocks the backend would have stashed; returns the state and the caches."""
    torch.manual_seed(0)
    state = WorkerEvictionState()
    state.num_layers, state.block_size = layers, BS
    config = EvictionConfig.from_flat(HEAD_ARGS)
    k = 4  # compact blocks 40..43; positional blocks 0..9
    state.begin_step((), compact_orders={"r": list(range(40, 40 + k))} if order else None)
    state.plan_row(0, "r", HEAD_ARGS, prompt_len, 0, prompt_len)
    assert state.rows[0].score and config.resolved_granularity == "head"
    keys = torch.randn(prompt_len, HKV, D)
    caches = {}
    for layer in range(layers):
        kv, pages = _packed_cache(keys + layer, keys - layer, torch.arange(10), num_blocks=48)
        caches[layer] = (kv, pages)
        if not (fail_copy and layer == layers - 1):
            state.kv_caches[layer] = (kv, _isa())
        state.record_scores(0, layer, torch.rand(HKV, prompt_len))
    state.requests["r"].source_blocks = torch.arange(10)
    state.finish_step()
    return state, caches, keys


def _isa():
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(torch.float32, BS, D, "auto")


def test_scoring_step_with_an_order_compacts_every_layer_after_the_forward():
    state, caches, keys = _scoring_step(order=True)
    head = state.requests["r"].head
    assert head is not None and not state.compact_orders and not state.kv_caches
    assert state.head_compacted == {"r": head.kept.head_budgets.flatten().tolist()}
    assert "r" not in state.history  # head granularity evicts no positional pages
    for layer, (kv, pages) in caches.items():
        got_k, _ = read_region(kv, pages, head.region, layer)
        want = torch.cat([(keys + layer)[head.kept.indices[layer][g], g] for g in range(HKV)])
        assert torch.equal(got_k, want)
    # later steps attend compact region + tail: the stock kernel gets the tail only
    state.begin_step(())
    state.plan_row(0, "r", HEAD_ARGS, PROMPT, PROMPT + 1, 1)
    assert state.head_rows[0].head is head
    assert torch.equal(state.compact_rows[0], torch.arange(PROMPT // BS))


def test_no_order_leaves_the_request_whole():
    state, _, _ = _scoring_step(order=False)
    assert state.requests["r"].head is None and not state.head_compacted and not state.head_failed
    state.begin_step(())
    state.plan_row(0, "r", HEAD_ARGS, PROMPT, PROMPT + 1, 1)
    assert not state.head_rows and not state.compact_rows


def test_failed_compaction_reports_the_order_back_and_leaves_the_request_whole():
    state, _, _ = _scoring_step(order=True, fail_copy=True)  # one layer's cache never seen
    assert state.head_failed == {"r"} and not state.head_compacted
    assert state.requests["r"].head is None and state.num_failed == 1


def test_a_reset_drops_the_order():
    state = WorkerEvictionState()
    state.begin_step((), compact_orders={"r": [1, 2]})
    state.finish_step()
    state.begin_step({"r"})
    assert "r" not in state.compact_orders


def test_failed_scoring_gives_the_order_back():
    state = WorkerEvictionState()
    state.num_layers, state.block_size = 1, BS
    state.begin_step((), compact_orders={"r": [40, 41]})
    state.plan_row(0, "r", HEAD_ARGS, PROMPT, 0, PROMPT)
    state.fail(0, RuntimeError("unsupported layer"))
    state.finish_step()
    assert state.head_failed == {"r"} and not state.compact_orders and state.requests["r"].head is None
