"""Page granularity: block scores and the kept-block count rule."""

from __future__ import annotations

import math
import random

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies import page_scores, select_pages

INF = float("inf")


def test_rows_are_normalised_so_layers_weigh_the_same():
    layer_a = torch.tensor([[1.0, 1.0, 1.0, 1.0]])  # .25 each
    layer_b = torch.tensor([[100.0, 0.0, 0.0, 300.0]])  # .25 0 0 .75
    # per token: .5 .25 .25 1.0 -> blocks of 2: .375, .625
    assert torch.allclose(page_scores([layer_a, layer_b], 2), torch.tensor([0.375, 0.625]))


def test_infinite_scores_count_as_the_row_maximum_and_negatives_are_shifted():
    protected = torch.tensor([[INF, 1.0, 1.0, 2.0]])  # finite .25 .25 .5; inf -> .5
    assert torch.allclose(page_scores([protected], 1), torch.tensor([0.5, 0.25, 0.25, 0.5]))
    negative = torch.tensor([[-1.0, -3.0, -2.0]])  # shifted 2 0 1 -> 2/3 0 1/3
    assert torch.allclose(page_scores([negative], 1), torch.tensor([2 / 3, 0.0, 1 / 3]))


def test_partial_last_block_is_a_mean_over_its_tokens():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0]])  # .2 each
    assert torch.allclose(page_scores([scores], 2), torch.tensor([0.2, 0.2, 0.2]))


def test_select_pages_keeps_window_blocks_then_the_best():
    # 100 tokens, blocks of 16: 7 blocks, the last holds 96..99; window 8 -> blocks 5, 6.
    blocks = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.3, 0.0, 0.0])
    tight = EvictionConfig(scorer="snapkv", budget=0.3, window=8)  # B = 30 -> 2 blocks
    assert select_pages(blocks, 100, 16, tight).tolist() == [5, 6]
    half = EvictionConfig(scorer="snapkv", budget=0.5, window=8)  # B = 50 -> 4 blocks
    assert select_pages(blocks, 100, 16, half).tolist() == [1, 3, 5, 6]
    sinks = EvictionConfig(scorer="streamingllm", budget=0.5, window=8)  # 4 sinks -> block 0
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
        config = EvictionConfig(scorer="snapkv", budget=budget, window=window, sinks=sinks)
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
