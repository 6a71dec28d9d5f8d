"""Head granularity with whole pages per head: run scores, the kept runs, ``K`` is the ideal,
and the compaction of those runs into head-pages with that ``K``."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_kvevict.cache import compact_blocks_needed, ideal_blocks, plan_compaction
from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies import (
    LayerInputs,
    LayerScores,
    build_policy,
    pages_per_head,
    plan_head_pages,
    run_scores,
    window_and_sinks,
)


def test_run_scores_are_means_and_required_runs_are_protected():
    values = torch.tensor([[1.0, 3.0, 5.0, 7.0, 2.0], [0.0, 0.0, 4.0, 9.0, -1.0]])
    protected = torch.zeros(2, 5, dtype=torch.bool)
    protected[1, 3] = True
    preferred = torch.zeros(2, 5, dtype=torch.bool)
    preferred[0, 0] = True
    runs = run_scores(LayerScores(values=values, protected=protected, preferred=preferred), 2)
    assert runs.values.shape == (2, 3)
    assert torch.equal(runs.values[0], torch.tensor([3.0, 6.0, 2.0]))  # the last run holds one token
    assert runs.values[1, 0] == 0.0 and runs.values[1, 1] == 4.0 and runs.values[1, 2] == -1.0
    assert runs.protected.tolist() == [[True, False, False], [False, True, False]]


@pytest.mark.parametrize("allocation", ["adakv", "adakv_floor", "uniform"])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_kv_heads", [1, 3])
def test_each_head_keeps_whole_runs_and_k_is_the_ideal(allocation, block_size, num_kv_heads, seed):
    generator = torch.Generator().manual_seed(seed)
    length, layers = 1000 + int(torch.randint(0, 40, (1,), generator=generator)), 3
    config = EvictionConfig(scorer="snapkv", budget=0.2, allocation=allocation, granularity="head", sinks=4)
    assert config.head_selection_for(block_size) == "page"
    # a few loud tokens per head so the heads' budgets differ
    ends = window_and_sinks(length, config.window, config.resolved_sinks)
    scores = [
        LayerScores.unprotected(torch.rand(num_kv_heads, length, generator=generator) ** 8).protect(ends)
        for _ in range(layers)
    ]
    kept = build_policy(config, block_size).plan_head(scores, length)
    pages = pages_per_head(config, length, block_size)
    assert pages == math.ceil(config.budget_tokens(length) / block_size)
    for row in kept.indices:
        runs = [torch.unique(idx // block_size) for idx in row]
        for idx, r in zip(row, runs):
            whole = (r.view(-1, 1) * block_size + torch.arange(block_size)).flatten()
            assert torch.equal(idx, whole[whole < length])
            assert set(range(length - config.window, length)) <= set(idx.tolist())
            assert idx.min() == 0  # the sinks' run
        assert sum(len(r) for r in runs) == num_kv_heads * pages
    k = compact_blocks_needed(config, length, block_size, layers, num_kv_heads)
    assert k == pages == ideal_blocks(config, length, length, block_size)
    # the runs fit the K blocks exactly: every head-page of the compaction is one whole run
    plan = plan_compaction(kept, list(range(100, 100 + k)), block_size, num_kv_heads)
    assert plan.num_layers == layers


def test_scores_and_plan_follow_the_selection(seed):
    generator = torch.Generator().manual_seed(seed)
    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    inputs = LayerInputs(keys=randn(2, 300, 8), values=randn(2, 300, 8), queries=randn(4, 32, 8), o_proj=randn(16, 32))
    pages = EvictionConfig(scorer="criticalkv", budget=0.2, granularity="head")
    tokens = pages.model_copy(update={"head_selection": "token"})
    # criticalkv's page variant: no first stage, nothing protected beyond window and sinks
    page_policy, token_policy = build_policy(pages, 32), build_policy(tokens, 32)
    page_scores = page_policy.score_layer(inputs)
    assert page_scores.preferred is None and page_scores.head_budgets is None
    assert torch.equal(page_scores.protected[0], window_and_sinks(300, pages.window, pages.resolved_sinks))
    token_scores = token_policy.score_layer(inputs)
    assert token_scores.preferred is not None and token_scores.head_budgets is not None
    token_kept = token_policy.plan_head([token_scores], 300)
    assert int(token_kept.head_budgets.sum()) == 2 * tokens.budget_tokens(300)
    page_kept = page_policy.plan_head([page_scores], 300)
    assert int(page_kept.head_budgets.sum()) == sum(len(i) for i in page_kept.indices[0])
    with pytest.raises(ValueError, match="page scores"):
        plan_head_pages([token_scores], pages, 300, 32)  # budgets fixed by stage 1 do not split pages


def test_whole_pages_need_a_per_layer_allocation():
    with pytest.raises(ValueError, match="head_selection"):
        EvictionConfig(scorer="pyramidkv", budget=0.2, head_selection="page")
    assert EvictionConfig(scorer="pyramidkv", budget=0.2).head_selection_for(16) == "token"
    assert EvictionConfig(scorer="laprox", budget=0.2).head_selection_for(16) == "token"
    critical = EvictionConfig(scorer="criticalkv", budget=0.2)
    assert [critical.head_selection_for(bs) for bs in (16, 32, 64, 128)] == ["page", "page", "token", "token"]
    assert EvictionConfig(scorer="criticalkv", budget=0.2, head_selection="token").head_selection_for(16) == "token"
    assert EvictionConfig(scorer="criticalkv", budget=0.2, head_selection="page").head_selection_for(128) == "page"
