"""Token scores for page granularity (``Scorer.page_score``, through ``Policy.score_layer``)."""

from __future__ import annotations

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies import LayerInputs, build_policy, build_scorer, page_scores, select_pages
from vllm_kvevict.policies.ops import value_l1_norm

L, HKV, GROUP, D, BLOCK, WINDOW = 256, 2, 2, 8, 16, 8
PLANTED = torch.tensor([20, 21, 22])  # three tokens of block 1 the window attends to strongly


def _needle_layer() -> LayerInputs:
    """Attention logits grow with position (recency), except 3 planted tokens that dominate."""
    gen = torch.Generator().manual_seed(0)
    keys = 0.01 * torch.randn(HKV, L, D, generator=gen)
    keys[..., 0] += torch.linspace(0.0, 2.0, L)
    keys[:, PLANTED, 0] = 4.0
    queries = 0.01 * torch.randn(HKV * GROUP, WINDOW, D, generator=gen)
    queries[..., 0] += 4.0
    return LayerInputs(
        keys=keys,
        values=torch.randn(HKV, L, D, generator=gen),
        queries=queries,
        positions=torch.arange(L),
        o_proj=torch.randn(16, HKV * GROUP * D, generator=gen),
    )


def _config(scorer: str) -> EvictionConfig:
    return EvictionConfig(scorer=scorer, budget=0.25, min_tokens=0, window=WINDOW, granularity="page")


def test_criticalkv_page_scores_are_its_stage2_criterion_without_a_first_stage():
    layer, config = _needle_layer(), _config("criticalkv")
    scores = build_policy(config, BLOCK).score_layer(layer)
    base = build_scorer(_config("snapkv")).score(layer)
    assert torch.equal(scores.values, (base.values + config.epsilon) * value_l1_norm(layer))
    assert torch.equal(scores.protected, base.protected)
    assert scores.protected[:, L - WINDOW :].all() and not scores.protected[:, : L - WINDOW].any()
    assert scores.preferred is None and scores.head_budgets is None


def test_scorers_without_a_page_variant_use_their_own_scores():
    layer, config = _needle_layer(), _config("snapkv")
    paged, own = build_policy(config, BLOCK).score_layer(layer), build_scorer(config).score(layer)
    assert torch.equal(paged.values, own.values) and torch.equal(paged.protected, own.protected)


def test_criticalkv_pages_keep_the_block_the_window_attends_to():
    # The head-mode output prefers a quarter of every row (stage 1), mostly recent tokens here,
    # so pooling it would rank blocks by stage-1 density and drop block 1.
    layer = _needle_layer()
    for scorer in ("snapkv", "criticalkv"):
        config = _config(scorer)
        blocks = page_scores([build_policy(config, BLOCK).score_layer(layer)], BLOCK)
        assert 1 in select_pages(blocks, L, BLOCK, config).tolist(), scorer
    config = _config("criticalkv")
    two_stage = page_scores([build_scorer(config).score(layer)], BLOCK)
    assert 1 not in select_pages(two_stage, L, BLOCK, config).tolist()  # why page_score exists
