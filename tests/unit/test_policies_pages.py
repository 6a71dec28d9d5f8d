"""Page granularity: block scores and the kept-block count rule."""

from __future__ import annotations

import math
import random

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies import LayerScores, build_policy, evicted_blocks, page_scores, select_pages


def unprotected(rows: list[list[float]]) -> LayerScores:
    return LayerScores.unprotected(torch.tensor(rows))


def test_rows_are_normalised_so_layers_weigh_the_same():
    layer_a = unprotected([[1.0, 1.0, 1.0, 1.0]])  # .25 each
    layer_b = unprotected([[100.0, 0.0, 0.0, 300.0]])  # .25 0 0 .75
    # per token: .5 .25 .25 1.0 -> blocks of 2: .375, .625
    assert torch.allclose(page_scores([layer_a, layer_b], 2), torch.tensor([0.375, 0.625]))


def test_protected_and_preferred_count_as_the_row_maximum_and_negatives_are_shifted():
    protected = unprotected([[7.0, 1.0, 1.0, 2.0]]).protect(torch.tensor([True, False, False, False]))
    # the others .25 .25 .5; the protected one -> .5
    assert torch.allclose(page_scores([protected], 1), torch.tensor([0.5, 0.25, 0.25, 0.5]))
    second = torch.tensor([[False, True, False, False]])
    preferred = LayerScores(protected.values, protected.protected, preferred=second)
    # the others 1/3 2/3; protected and preferred -> 2/3
    assert torch.allclose(page_scores([preferred], 1), torch.tensor([2 / 3, 2 / 3, 1 / 3, 2 / 3]))
    negative = unprotected([[-1.0, -3.0, -2.0]])  # shifted 2 0 1 -> 2/3 0 1/3
    assert torch.allclose(page_scores([negative], 1), torch.tensor([2 / 3, 0.0, 1 / 3]))


def test_partial_last_block_is_a_mean_over_its_tokens():
    scores = unprotected([[1.0, 1.0, 1.0, 1.0, 1.0]])  # .2 each
    assert torch.allclose(page_scores([scores], 2), torch.tensor([0.2, 0.2, 0.2]))


def test_select_pages_keeps_window_blocks_then_the_best():
    # 100 tokens, blocks of 16: 7 blocks, the last holds 96..99; window 8 -> blocks 5, 6.
    blocks = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.3, 0.0, 0.0])
    tight = EvictionConfig(scorer="snapkv", budget=0.3, min_tokens=0, window=8)  # B = 30 -> 2 blocks
    assert select_pages(blocks, 100, 16, tight).tolist() == [5, 6]
    half = EvictionConfig(scorer="snapkv", budget=0.5, min_tokens=0, window=8)  # B = 50 -> 4 blocks
    assert select_pages(blocks, 100, 16, half).tolist() == [1, 3, 5, 6]
    sinks = EvictionConfig(scorer="streamingllm", budget=0.5, min_tokens=0, window=8)  # 4 sinks -> block 0
    assert select_pages(blocks, 100, 16, sinks).tolist() == [0, 1, 5, 6]


def test_select_pages_budget_one_keeps_every_block():
    config = EvictionConfig(scorer="snapkv", budget=1.0)
    assert select_pages(torch.zeros(4), 50, 16, config).tolist() == [0, 1, 2, 3]


def test_select_pages_count_rule_and_plugin_bound():
    rng = random.Random(0)
    for _ in range(300):
        block_size = rng.choice([1, 4, 16, 32])
        seq_len = rng.randint(40, 700)
        window, sinks = rng.randint(1, 32), rng.randint(0, 6)
        budget = rng.choice([0.1, 0.25, 0.5, 0.9, rng.randint(window + sinks + 1, 800)])
        if isinstance(budget, float) and int(seq_len * budget) < window + sinks:
            budget = 0.5
        config = EvictionConfig(scorer="snapkv", budget=budget, min_tokens=0, window=window, sinks=sinks)
        num_blocks = math.ceil(seq_len / block_size)
        kept = select_pages(torch.rand(num_blocks), seq_len, block_size, config)
        assert torch.all(kept[1:] > kept[:-1])
        held = set(kept.tolist())
        assert num_blocks - 1 in held
        assert {pos // block_size for pos in range(seq_len - min(window, seq_len), seq_len)} <= held
        assert {pos // block_size for pos in range(min(sinks, seq_len))} <= held
        tokens = config.budget_tokens(seq_len)
        if tokens >= seq_len:
            assert len(kept) == num_blocks
            continue
        assert len(kept) >= min(num_blocks, math.ceil(tokens / block_size))
        assert len(kept) <= math.ceil(tokens / block_size) + 2
        if isinstance(budget, float):
            assert len(kept) <= math.ceil(budget * num_blocks) + 2


def test_evicted_blocks_are_the_full_blocks_not_kept_before_the_last_one():
    # 100 tokens, blocks of 16: block 6 holds 96..99; window 8 (blocks 5, 6), B = 50 -> 4 blocks.
    config = EvictionConfig(scorer="snapkv", budget=0.5, min_tokens=0, window=8)
    values = torch.zeros(1, 100)
    values[0, 16:32], values[0, 48:64] = 2.0, 1.0  # blocks 1 and 3 score highest
    scores = [LayerScores.unprotected(values).protect(torch.arange(100) >= 92)]
    assert evicted_blocks(scores, 100, 16, config) == [0, 2, 4]
    assert build_policy(config, 16).evicted_blocks(scores, 100) == [0, 2, 4]
    assert evicted_blocks(scores, 100, 16, EvictionConfig(scorer="snapkv", budget=1.0)) == []
