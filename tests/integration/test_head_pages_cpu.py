"""Compacted rows through vLLM-CPU's own attention op on single-head pages, in real vLLM (issue 14).

A 704-token prompt (whole blocks) served under three head-granular policies in one batch: the two
that keep whole pages per head (snapkv and criticalkv with Ada-KV) must decode through
:func:`~vllm_kvevict.vllm.backends.cpu_head_pages.attend_head_pages` in every decode step and
layer, the one keeping single tokens per head must not (it keeps the torch path). Every call's
output for its rows is checked in the engine against the torch two-segment path over the same
cache and queries, and the greedy outputs must equal the reference engine's compacted
generation over the served kept sets.
"""

from __future__ import annotations

import pytest
import torch
from test_head_granularity import NEW_TOKENS, POLICIES, _reference, _serve, reference_generation

from vllm_kvevict.vllm.backends import cpu_head_pages
from vllm_kvevict.vllm.inprocess import random_prompt

pytestmark = pytest.mark.slow

WHOLE_PAGES = ["snapkv-adakv", "criticalkv-adakv"]
NAMES = WHOLE_PAGES + ["snapkv-adakv-tokens"]
PROMPT_LEN = 704


@pytest.fixture(scope="module")
def prompt():
    return random_prompt(PROMPT_LEN, seed=7)


@pytest.fixture(scope="module")
def served(tiny_llama_dir, prompt):
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from vllm_kvevict.vllm.backends.head_rows import attend_row
    from vllm_kvevict.vllm.layouts import CpuPackedLayout

    calls, original = [], cpu_head_pages.attend_head_pages

    def checked(batch, layer_idx, query, kv_cache, output, num_heads, scale, attention):
        original(batch, layer_idx, query, kv_cache, output, num_heads, scale, attention)
        num_blocks, hkv, bs, two_d = kv_cache.shape
        layout = CpuPackedLayout(hkv, bs, two_d // 2, _get_attn_isa(kv_cache.dtype, bs, two_d // 2, "auto"),
                                 kv_cache.dtype)
        q = query.reshape(query.shape[0], num_heads, -1)
        worst = 0.0
        for row in batch.head_rows:
            want = attend_row(row, layer_idx, q, kv_cache, layout, scale)
            got = output.reshape(output.shape[0], num_heads, -1)[row.query_offset : row.query_offset + row.num_queries]
            worst = max(worst, float((got.float() - want).abs().max()))
        calls.append(([row.req_id for row in batch.head_rows], worst))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_head_pages, "attend_head_pages", checked)
        result = _serve(tiny_llama_dir, prompt, {n: POLICIES[n] for n in NAMES}, max_model_len=2048,
                        enable_prefix_caching=False, kv_cache_memory_bytes=16 << 20)
    return result, calls


def test_whole_page_rows_decode_through_the_stock_op_every_step(served):
    """Each whole-page request in one call per layer and decode step after its compaction (its
    first token comes from the prefill); the single-token request in none (requests are named
    by their index in the batch)."""
    result, calls = served
    assert calls, "vLLM's op never attended a compacted row"
    layers = len(result[NAMES[0]][1].indices)
    seen = {}
    for req_ids, _ in calls:
        for req_id in req_ids:
            name = NAMES[int(req_id.split("-")[0])]
            seen[name] = seen.get(name, 0) + 1
    assert set(seen) == set(WHOLE_PAGES), seen
    assert all(count >= (NEW_TOKENS - 1) * layers for count in seen.values()), seen


def test_stock_op_output_equals_the_torch_path_in_the_engine(served):
    _, calls = served
    worst = max(w for _, w in calls)
    assert worst < 1e-4, worst


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, prompt, served):  # served first: one engine alive at a time
    return _reference(tiny_llama_dir, prompt)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_output_equals_reference_compacted_generation(name, served, reference):
    result, _ = served
    tokens, kept = result[name]
    assert len(tokens) == NEW_TOKENS
    assert tokens == reference_generation(name, kept, *reference)
