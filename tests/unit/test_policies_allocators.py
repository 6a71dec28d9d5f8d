"""Allocators on hand-computed scores (called directly, nothing protected unless said)."""

from __future__ import annotations

import pytest
import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies import ALLOCATORS, LayerScores, global_layer_cap, pyramid_layer_budget

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # one torch thread: see conftest


def allocate(name: str, scores: list[torch.Tensor], budget: int, **fields) -> list[list[int]]:
    config = EvictionConfig(scorer="snapkv", **fields)
    layers = [s if isinstance(s, LayerScores) else LayerScores.unprotected(s) for s in scores]
    return ALLOCATORS[name](layers, budget, config).tolist()


HEADS = torch.tensor(
    [
        [9.0, 8.0, 7.0, 6.0],
        [0.5, 0.1, 0.2, 0.3],
        [5.0, 4.0, 1.0, 1.0],
    ]
)


def test_uniform():
    assert allocate("uniform", [HEADS, HEADS], 2) == [[2, 2, 2], [2, 2, 2]]


def test_adakv_largest_remainder():
    # top 6 of the layer: 9 8 7 6 | 5 4 -> winners f = (4, 0, 2), B = 2.
    # alpha 0.3: 0.7 f + 0.6 = 3.4, 0.6, 2.0 -> floors 3, 0, 2 (sum 5); largest remainder: head 1.
    assert allocate("adakv", [HEADS], 2, alpha=0.3) == [[3, 1, 2]]
    # alpha 0.2: 3.6, 0.4, 2.0 -> floors 3, 0, 2; largest remainder: head 0.
    assert allocate("adakv", [HEADS], 2, alpha=0.2) == [[4, 0, 2]]
    # alpha 1: uniform; alpha 0: the raw winners
    assert allocate("adakv", [HEADS], 2, alpha=1.0) == [[2, 2, 2]]
    assert allocate("adakv", [HEADS], 2, alpha=0.0) == [[4, 0, 2]]


def test_adakv_floor_is_kvpress_safeguard_then_topk():
    # n_safe = max(1, int(2 * 0.5)) = 1: 9, 0.5, 5 forced; then the best 3 others: 8, 7, 6.
    assert allocate("adakv_floor", [HEADS], 2, alpha=0.5) == [[4, 1, 1]]
    # alpha 0: no safeguard, plain layer top-k -> winners (4, 0, 2)
    assert allocate("adakv_floor", [HEADS], 2, alpha=0.0) == [[4, 0, 2]]


def test_pyramid_linear_schedule():
    # L = 1000, W = 8, budget 0.4: target 400, min = 400/20 = 20, max = 800 - 20 = 780,
    # 5 layers: step (780 - 20) / 4 = 190.
    config = EvictionConfig(scorer="pyramidkv", budget=0.4, min_tokens=0, window=8)
    budgets = [pyramid_layer_budget(layer, 5, 1000, config) for layer in range(5)]
    assert budgets == [780, 590, 400, 210, 20]
    scores = [LayerScores.unprotected(torch.zeros(2, 1000))] * 5
    assert ALLOCATORS["pyramid"](scores, 400, config).tolist() == [[b, b] for b in budgets]


def test_pyramid_short_prompt_falls_back_to_uniform():
    # target 40 / 20 = 2 < window 8: every layer keeps round(40) (kvpress fallback)
    config = EvictionConfig(scorer="pyramidkv", budget=0.4, min_tokens=0, window=8)
    assert [pyramid_layer_budget(layer, 4, 100, config) for layer in range(4)] == [40] * 4


def test_pyramid_caps_the_first_layer_at_the_candidates():
    # target 0.8 * 100 = 80: max = 160 - 4 = 156 > L - W = 92 -> max 92, min = 160 - 92 = 68
    config = EvictionConfig(scorer="pyramidkv", budget=0.8, min_tokens=0, window=8)
    assert [pyramid_layer_budget(layer, 2, 100, config) for layer in range(2)] == [92, 68]


def test_global_picks_across_layers():
    layer0 = torch.tensor([[4.0, 3.0, 2.0, 1.0]])  # normalised .4 .3 .2 .1
    layer1 = torch.tensor([[1.0, 1.0, 1.0, 7.0]])  # normalised .1 .1 .1 .7
    # top 4 of .7 .4 .3 .2 ...: layer 0 three, layer 1 one
    assert allocate("global", [layer0, layer1], 2) == [[3], [1]]


def test_global_normalises_negative_scores_by_shifting():
    layer0 = torch.tensor([[-1.0, -2.0, -3.0, -4.0]])  # shifted 3 2 1 0 -> .5 .33 .17 0
    layer1 = torch.tensor([[0.0, 0.0, 0.0, 1.0]])  # 0 0 0 1
    assert allocate("global", [layer0, layer1], 2) == [[3], [1]]


def test_global_layer_cap_binds():
    # 4 layers, 1 head, L = 8, B = 2: cap = min(8, 2 * 2) = 4 per layer, total 8.
    flat = torch.full((1, 8), 1.0)  # .125 each
    peaked = torch.tensor([[0.94] + [0.06 / 7] * 7])
    budgets = allocate("global", [flat, peaked, peaked, peaked], 2)
    assert global_layer_cap(2, 8) == 4
    # without the cap layer 0 would take 5 (.94 x 3 then .125 x 5); capped at 4, the 8th slot
    # goes to the best remaining entry (.0086, ties -> layer 1)
    assert budgets == [[4], [2], [1], [1]]


def test_global_keeps_protected_entries():
    first = torch.tensor([True, False, False, False])
    layer0 = LayerScores.unprotected(torch.tensor([[0.0, 1.0, 1.0, 1.0]])).protect(first)  # others 1/3 each
    layer1 = LayerScores.unprotected(torch.tensor([[0.0, 4.0, 4.0, 2.0]])).protect(first)  # .4 .4 .2
    assert allocate("global", [layer0, layer1], 2) == [[1], [3]]


def test_adakv_counts_protected_then_preferred_winners():
    # One layer, B = 2, 2 heads: head 0 protects 1 token, head 1 prefers 2 (below head 0's values).
    values = torch.tensor([[0.0, 9.0, 8.0, 7.0], [0.1, 0.2, 0.0, 0.0]])
    preferred = torch.tensor([[False] * 4, [True, True, False, False]])
    scores = LayerScores(values, torch.tensor([[True, False, False, False], [False] * 4]), preferred=preferred)
    # top 4 of the layer: head 0's protected token, head 1's two preferred, then 9 -> f = (2, 2)
    assert allocate("adakv", [scores], 2, alpha=0.0) == [[2, 2]]
    assert allocate("adakv", [LayerScores.unprotected(values)], 2, alpha=0.0) == [[3, 1]]  # 9 8 7 .2
