"""The reference engine with the real policies (tiny random GQA Llama): head and page modes."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_kvevict import policies
from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.head_page_select import pages_per_head
from vllm_kvevict.reference.selection import kept_blocks

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # one torch thread: see conftest

PROMPT_LEN = 200
#: every scorer but lkv, which reads an artifact made for a model (tests/unit/test_lkv_reference.py)
SCORERS = [s for s in policies.SCORERS if s not in ("none", "lkv")]


@pytest.fixture(scope="module")
def prompt_ids() -> torch.Tensor:
    return torch.randint(10, 40000, (PROMPT_LEN,), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def prefilled(tiny_engine, prompt_ids):
    return tiny_engine.prefill(prompt_ids)


@pytest.mark.parametrize("scorer", SCORERS)
def test_head_mode_cache_is_the_policys_kept_set(tiny_engine, prefilled, scorer):
    config = EvictionConfig(scorer=scorer, budget=0.3, min_tokens=0, granularity="head", head_selection="token", window=16)
    expected = policies.compute_kept(tiny_engine.layer_inputs(prefilled, config), config)
    out = tiny_engine.generate(prefilled, config, 3, stop_on_eos=False, return_cache=True)
    assert torch.equal(out.kept_per_head, expected.head_budgets)
    assert out.memory_fraction < 0.5
    for layer, row in enumerate(out.cache.stores):
        for head, store in enumerate(row):
            idx = expected.indices[layer][head]
            assert torch.equal(out.kept[layer][head], idx)
            k = idx.numel()
            assert store.length == k + 2
            assert torch.equal(store.keys[:k], prefilled.keys[layer][head, idx])
            assert torch.equal(store.values[:k], prefilled.values[layer][head, idx])
            assert store.positions[k:].tolist() == [PROMPT_LEN, PROMPT_LEN + 1]
            # The window is always kept.
            assert set(range(PROMPT_LEN - 16, PROMPT_LEN)) <= set(idx.tolist())


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("scorer", ["snapkv", "criticalkv", "streamingllm"])
def test_page_mode_keeps_whole_blocks_for_every_head(tiny_engine, prefilled, scorer, block_size):
    config = EvictionConfig(scorer=scorer, budget=0.3, min_tokens=0, granularity="page", window=16)
    out = tiny_engine.generate(prefilled, config, 2, stop_on_eos=False, block_size=block_size, return_cache=True)
    blocks = kept_blocks(prefilled, config, block_size)
    tokens = out.kept[0][0]
    assert all(torch.equal(idx, tokens) for row in out.kept for idx in row)
    block_of = tokens // block_size
    assert torch.equal(torch.unique(block_of), blocks)
    for b in blocks.tolist():
        whole = range(b * block_size, min(PROMPT_LEN, (b + 1) * block_size))
        assert set(whole) <= set(tokens.tolist())
    assert len(blocks) < -(-PROMPT_LEN // block_size)  # something was evicted
    assert out.memory_fraction == pytest.approx(tokens.numel() / PROMPT_LEN)
    for row in out.cache.stores:
        for store in row:
            assert store.length == tokens.numel() + 1


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("scorer", ["snapkv", "criticalkv", "defensivekv"])
def test_head_mode_with_whole_pages_keeps_block_aligned_runs_per_head(tiny_engine, prefilled, scorer, block_size):
    config = EvictionConfig(scorer=scorer, budget=0.3, min_tokens=0, granularity="head", window=16)
    assert config.head_selection_for(block_size) == "page"  # the default for adakv at 16 and 32
    out = tiny_engine.generate(prefilled, config, 2, stop_on_eos=False, block_size=block_size, return_cache=True)
    pages = pages_per_head(config, PROMPT_LEN, block_size)
    assert pages == math.ceil(config.budget_tokens(PROMPT_LEN) / block_size)
    runs_kept = []
    for row in out.kept:
        heads = [set((idx // block_size).tolist()) for idx in row]
        for idx, runs in zip(row, heads):
            # every kept run is whole (the prompt's last run may be short), window included
            whole = {t for r in runs for t in range(r * block_size, min(PROMPT_LEN, (r + 1) * block_size))}
            assert set(idx.tolist()) == whole
            assert set(range(PROMPT_LEN - 16, PROMPT_LEN)) <= set(idx.tolist())
        assert sum(len(r) for r in heads) == len(row) * pages  # the layer's head-pages, exactly
        runs_kept.append(heads)
    if block_size == 16:  # 13 runs, 2 of 4 per head free to choose: the heads choose differently
        assert any(len({frozenset(r) for r in heads}) > 1 for heads in runs_kept)


def test_question_after_eviction_from_a_sliced_prefill(tiny_engine, prompt_ids, prefilled):
    """``prefix(n)`` + the rest as a suffix equals the whole prompt at full cache, and the
    policy then sees only the first ``n`` tokens."""
    n = 150
    full = tiny_engine.generate(prefilled, EvictionConfig(), 12, stop_on_eos=False)
    split = tiny_engine.generate(prefilled.prefix(n), EvictionConfig(), 12, stop_on_eos=False, suffix_ids=prompt_ids[n:])
    assert split.token_ids == full.token_ids
    config = EvictionConfig(scorer="snapkv", budget=0.5, min_tokens=0, granularity="head", head_selection="token", window=16)
    evicted = tiny_engine.generate(prefilled.prefix(n), config, 2, stop_on_eos=False, suffix_ids=prompt_ids[n:], return_cache=True)
    assert evicted.prompt_len == n
    assert int(evicted.kept_per_head.sum()) == config.budget_tokens(n) * evicted.kept_per_head.numel()
    store = evicted.cache.stores[0][0]
    assert store.positions[-(PROMPT_LEN - n + 1) :].tolist() == list(range(n, PROMPT_LEN + 1))
    with pytest.raises(ValueError):
        tiny_engine.generate(prefilled.prefix(n), config, 2)


def test_a_given_kept_set_replaces_the_policys_choice(tiny_engine, prefilled):
    config = EvictionConfig(scorer="snapkv", budget=0.3, min_tokens=0, granularity="head", window=16)
    other = EvictionConfig(scorer="knorm", budget=0.3, min_tokens=0, granularity="head", head_selection="token", window=16)
    kept = policies.compute_kept(tiny_engine.layer_inputs(prefilled, other), other)
    out = tiny_engine.generate(prefilled, config, 4, stop_on_eos=False, kept=kept)
    assert torch.equal(out.kept_per_head, kept.head_budgets)
    assert out.token_ids == tiny_engine.generate(prefilled, other, 4, stop_on_eos=False).token_ids
