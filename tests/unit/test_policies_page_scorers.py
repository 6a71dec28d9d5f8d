"""Token scores for page granularity (``policies.page_score_layer``)."""

from __future__ import annotations

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies import (
    LayerInputs,
    page_score_layer,
    page_scores,
    protect,
    score_layer,
    select_pages,
)
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
    return EvictionConfig(scorer=scorer, budget=0.25, window=WINDOW, granularity="page")


def test_criticalkv_page_scores_are_its_stage2_criterion_without_marks():
    layer, config = _needle_layer(), _config("criticalkv")
    scores = page_score_layer(layer, config)
    base = protect(score_layer(layer, _config("snapkv")), config)
    assert torch.equal(scores, (base + config.epsilon) * value_l1_norm(layer))
    assert torch.isinf(scores[:, L - WINDOW :]).all()
    assert torch.isfinite(scores[:, : L - WINDOW]).all()


def test_scorers_without_a_page_variant_use_their_own_scores():
    layer, config = _needle_layer(), _config("snapkv")
    assert torch.equal(page_score_layer(layer, config), score_layer(layer, config))


def test_criticalkv_pages_keep_the_block_the_window_attends_to():
    # The head-mode output marks a quarter of every row +inf, mostly recent tokens here, so
    # pooling it would rank blocks by mark density and drop block 1.
    layer = _needle_layer()
    for scorer in ("snapkv", "criticalkv"):
        config = _config(scorer)
        blocks = page_scores([protect(page_score_layer(layer, config), config)], BLOCK)
        assert 1 in select_pages(blocks, L, BLOCK, config).tolist(), scorer
    config = _config("criticalkv")
    marked = page_scores([protect(score_layer(layer, config), config)], BLOCK)
    assert 1 not in select_pages(marked, L, BLOCK, config).tolist()  # why page_score_layer exists
