"""Compact-region size from the budget alone, the tail rule, and block accounting."""

from __future__ import annotations

import itertools
import math

import pytest

from vllm_kvevict.cache import (
    LayerBudgetBound,
    compact_blocks_needed,
    head_pages_bound,
    held_blocks,
    ideal_blocks,
    layer_budget_bounds,
    memory_efficiency,
    prompt_tail_layout,
    simple_compact_blocks_bound,
)
from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies import global_layer_cap, pyramid_layer_budget

CONFIGS = [
    EvictionConfig(scorer="snapkv", budget=0.1),  # adakv
    EvictionConfig(scorer="snapkv", allocation="adakv_floor", budget=0.2),
    EvictionConfig(scorer="streamingllm", budget=0.1),  # uniform
    EvictionConfig(scorer="criticalkv", budget=0.3),
    EvictionConfig(scorer="pyramidkv", budget=0.1),  # pyramid
    EvictionConfig(scorer="laprox", budget=0.1),  # global
    EvictionConfig(scorer="defensivekv", allocation="global", budget=200),
    EvictionConfig(scorer="snapkv", budget=1.0),  # keeps everything
    EvictionConfig(scorer="snapkv", budget=5000),  # token budget past the prompt
]


def exhaustive_max_pages(total: int, head_max: int, block_size: int, num_kv_heads: int) -> int:
    """Largest ``sum_g ceil(B_g / bs)`` over every ``B`` with ``sum B <= total``, ``B_g <= head_max``."""
    best = 0
    for budgets in itertools.product(range(head_max + 1), repeat=num_kv_heads):
        if sum(budgets) <= total:
            best = max(best, sum(math.ceil(b / block_size) for b in budgets))
    return best


@pytest.mark.parametrize("num_kv_heads", [1, 2, 3])
@pytest.mark.parametrize("block_size", [1, 3, 4])
def test_head_pages_bound_covers_every_split(num_kv_heads, block_size):
    head_max = 9
    for mean in range(0, head_max + 1):
        bound = head_pages_bound(LayerBudgetBound(mean, head_max), block_size, num_kv_heads)
        worst = exhaustive_max_pages(num_kv_heads * mean, head_max, block_size, num_kv_heads)
        assert bound >= worst, (mean, bound, worst)
        # never looser than DESIGN.md's ceil(Bbar / bs) + 1 blocks
        assert math.ceil(bound / num_kv_heads) <= math.ceil(mean / block_size) + 1


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.describe())
@pytest.mark.parametrize("block_size", [16, 32, 128])
@pytest.mark.parametrize("num_kv_heads", [1, 2, 3, 8])
def test_k_is_at_most_the_design_bound(config, block_size, num_kv_heads):
    for prompt_len in (1, 100, 1000, 4096, 4099):
        k = compact_blocks_needed(config, prompt_len, block_size, 30, num_kv_heads)
        assert 0 < k <= simple_compact_blocks_bound(config, prompt_len, block_size, 30)


def test_layer_bounds_follow_the_allocation():
    prompt_len, num_layers = 4096, 30
    b = 409
    assert layer_budget_bounds(CONFIGS[0], prompt_len, num_layers)[0] == LayerBudgetBound(b, prompt_len)
    assert layer_budget_bounds(CONFIGS[2], prompt_len, num_layers)[0] == LayerBudgetBound(b, b)
    pyramid = layer_budget_bounds(CONFIGS[4], prompt_len, num_layers)
    assert [x.mean for x in pyramid] == [pyramid_layer_budget(i, num_layers, prompt_len, CONFIGS[4]) for i in range(30)]
    glob = layer_budget_bounds(CONFIGS[5], prompt_len, num_layers)[0]
    assert glob == LayerBudgetBound(global_layer_cap(b, prompt_len), prompt_len)
    assert layer_budget_bounds(CONFIGS[7], prompt_len, 2) == [LayerBudgetBound(prompt_len, prompt_len)] * 2


def test_k_examples():
    adakv, uniform, pyramid, laprox, everything = CONFIGS[0], CONFIGS[2], CONFIGS[4], CONFIGS[5], CONFIGS[7]
    # 409 tokens per head at bs=16: 26 pages per head when heads are equal, one more block otherwise
    assert compact_blocks_needed(uniform, 4096, 16, 30, 3) == 26
    assert compact_blocks_needed(adakv, 4096, 16, 30, 3) == 26  # whole pages per head: the ideal
    tokens = adakv.model_copy(update={"head_selection": "token"})
    assert compact_blocks_needed(tokens, 4096, 16, 30, 3) == 27  # any split of single tokens
    assert compact_blocks_needed(tokens, 4096, 16, 30, 1) == 26  # one head: no imbalance
    top = pyramid_layer_budget(0, 30, 4096, pyramid)
    assert compact_blocks_needed(pyramid, 4096, 16, 30, 3) == math.ceil(top / 16)
    # cap 818 = 51 * 16 + 2: at most 3 * 818 + 3 * 15 = 2499 tokens' worth, 156 pages, 52 blocks
    assert compact_blocks_needed(laprox, 4096, 16, 30, 3) == 52
    assert compact_blocks_needed(laprox, 4096, 16, 30, 8) == 52
    assert compact_blocks_needed(everything, 4096, 16, 30, 8) == 256  # the prompt's own blocks


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="block_size"):
        compact_blocks_needed(CONFIGS[0], 100, 0, 2, 2)
    with pytest.raises(ValueError, match="num_kv_heads"):
        compact_blocks_needed(CONFIGS[0], 100, 16, 2, 0)


@pytest.mark.parametrize("prompt_len,block_size", [(100, 16), (96, 16), (1, 16), (16, 16), (300, 128)])
def test_tail_layout(prompt_len, block_size):
    tail = prompt_tail_layout(prompt_len, block_size)
    assert tail.tail_start == prompt_len
    # the first tail block is the one position prompt_len (the next token) lives in
    assert tail.first_tail_block == prompt_len // block_size
    assert tail.first_tail_block * block_size + tail.skipped_slots == prompt_len
    released = list(tail.released_block_indices)
    # released blocks hold only prompt positions; every prompt block not released is the first tail block
    assert all((i + 1) * block_size <= prompt_len for i in released)
    prompt_blocks = math.ceil(prompt_len / block_size)
    assert set(range(prompt_blocks)) - set(released) == ({tail.first_tail_block} if tail.skipped_slots else set())
    table = list(range(100, 100 + prompt_blocks + 3))
    assert tail.released_block_ids(table) == table[: len(released)]
    assert tail.tail_blocks(prompt_len) == prompt_blocks - len(released)
    # vLLM keeps allocating by position: token at position p needs block p // bs
    for generated in (1, block_size, 3 * block_size + 1):
        seq_len = prompt_len + generated
        assert tail.tail_blocks(seq_len) == (seq_len - 1) // block_size + 1 - tail.first_tail_block
    with pytest.raises(ValueError):
        tail.tail_blocks(prompt_len - 1)


def test_held_and_ideal_blocks():
    config = CONFIGS[0]
    held = held_blocks(config, 4096, 4096 + 20, 16, 30, 3)
    assert held.compact == compact_blocks_needed(config, 4096, 16, 30, 3)
    assert held.tail == 2  # 20 generated tokens after a prompt ending on a block boundary
    assert held.total == held.compact + 2
    assert ideal_blocks(config, 4096, 4096, 16) == math.ceil(0.1 * 256)
    assert ideal_blocks(config, 4096, 4096 + 20, 16) == math.ceil(0.1 * 256) + 2
    token = EvictionConfig(scorer="snapkv", budget=512)
    assert ideal_blocks(token, 4096, 4096, 16) == 32


@pytest.mark.parametrize("budget", [0.1, 0.2])
@pytest.mark.parametrize("scorer", ["snapkv", "criticalkv", "defensivekv", "streamingllm"])
def test_memory_efficiency_target_for_4k_prompts(scorer, budget):
    """Issue 4's target (>= 0.9 at 4k, budgets 0.1/0.2) holds by construction at bs=16."""
    config = EvictionConfig(scorer=scorer, budget=budget)
    for num_kv_heads in (1, 3, 8):
        assert memory_efficiency(config, 4096, 4097, 16, 30, num_kv_heads) >= 0.9


def test_global_allocation_costs_its_layer_cap():
    """``global`` reserves the cap (2x the budget) in every layer: efficiency about 1/2."""
    config = CONFIGS[5]
    efficiency = memory_efficiency(config, 4096, 4097, 16, 30, 3)
    assert 0.45 < efficiency < 0.55


def test_pyramid_costs_its_largest_layer():
    """``pyramid`` sizes every layer like layer 0 (about 2B - B/20) once its schedule applies."""
    steep = EvictionConfig(scorer="pyramidkv", budget=0.2)
    assert 0.45 < memory_efficiency(steep, 4096, 4097, 16, 30, 3) < 0.55
    # at 0.1 with window 32, B/20 < window: kvpress's fallback gives every layer B (uniform)
    flat = EvictionConfig(scorer="pyramidkv", budget=0.1)
    assert memory_efficiency(flat, 4096, 4097, 16, 30, 3) >= 0.9
