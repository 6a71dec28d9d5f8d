"""VECTOR's routes: memory equal to plain eviction at the same budget, the default p_a, window
whole, key-only by smallest residual among the pooled tokens."""

from __future__ import annotations

import pytest
import torch

from vllm_kvevict.config import EvictionConfig, EvictionConfigError
from vllm_kvevict.policies import LayerScores, plan_kept, rank
from vllm_kvevict.policies.vector import converted_slots, plan_vector, split_routes


def _scores(seed: int, hkv: int = 3, L: int = 200, window: int = 8) -> LayerScores:
    g = torch.Generator().manual_seed(seed)
    protected = torch.zeros(hkv, L, dtype=torch.bool)
    protected[:, L - window:] = True
    return LayerScores(values=torch.rand(hkv, L, generator=g), protected=protected,
                       residuals=torch.rand(hkv, L, generator=g))


@pytest.mark.parametrize("budget, expected", [(0.1, 0.05), (0.25, 0.125), (0.5, 0.25), (0.8, 0.1), (0.05, 0.025)])
def test_default_share_is_min_of_half_compression_and_half_budget(budget, expected):
    config = EvictionConfig(scorer="keydiff", budget=budget, vector="on")
    assert config.vector_share_for(10_000) == pytest.approx(expected)  # the floor (192) does not bind
    assert EvictionConfig(scorer="keydiff", budget=budget, vector="on", vector_share=0.02).vector_share_for(10_000) == 0.02


@pytest.mark.parametrize("budget", [0.05, 0.1, 0.25, 0.5, 0.9, 64])
def test_memory_equals_plain_eviction_at_the_same_budget(budget, seed):
    L = 300
    layers = [_scores(seed + i, L=L) for i in range(4)]
    plain = EvictionConfig(scorer="keydiff", budget=budget, window=8)
    vector = EvictionConfig(scorer="keydiff", budget=budget, window=8, vector="on")
    base = plan_kept(layers, plain, L)
    routed = plan_vector(layers, vector, L)
    assert torch.equal(routed.head_budgets, base.head_budgets)  # the same allocation, in slots
    ratio = vector.vector_share_for(L) * L / vector.budget_tokens(L)
    for layer, (whole, key_only) in enumerate(zip(routed.indices, routed.key_only)):
        for g, (w, k) in enumerate(zip(whole, key_only)):
            B = int(base.head_budgets[layer, g])
            assert k.numel() % 2 == 0  # two key-only tokens fill one slot
            assert w.numel() + k.numel() // 2 == B  # slots held = plain eviction's
            assert not set(w.tolist()) & set(k.tolist())
            a = int(converted_slots(torch.tensor([B]), ratio, torch.tensor([8]), L)[0])
            assert k.numel() == 2 * a and w.numel() == B - a
            assert set(range(L - 8, L)) <= set(w.tolist())  # the window stays whole


def test_key_only_tokens_are_the_pooled_ones_with_the_smallest_residual(seed):
    scores = _scores(seed, hkv=2, L=100, window=4)
    budgets = torch.tensor([30, 20])
    whole, key_only = split_routes(scores, budgets, ratio=0.5)
    a = torch.tensor([15, 10])
    pool = rank(scores) < (budgets + a)[:, None]
    for g in range(2):
        assert int(key_only[g].sum()) == 2 * a[g] and int(whole[g].sum()) == budgets[g] - a[g]
        assert torch.equal(whole[g] | key_only[g], pool[g])
        candidates = pool[g] & ~scores.protected[g]
        worst_key_only = scores.residuals[g][key_only[g]].max()
        best_whole = scores.residuals[g][whole[g] & candidates].min()
        assert worst_key_only <= best_whole


def test_share_is_capped_so_the_window_fits_whole_and_the_pool_fits_the_prompt():
    a = converted_slots(torch.tensor([10, 40, 95]), ratio=1.0, protected=torch.tensor([8, 8, 8]), seq_len=100)
    assert a.tolist() == [2, 32, 5]


def test_residuals_are_required():
    scores = LayerScores.unprotected(torch.rand(2, 10))
    with pytest.raises(ValueError, match="residuals"):
        split_routes(scores, torch.tensor([3, 3]), 0.5)


def test_keep_everything_keeps_everything_whole():
    layers = [_scores(1, L=50)]
    kept = plan_vector(layers, EvictionConfig(scorer="keydiff", budget=1.0, vector="on"), 50)
    assert kept.key_only is None and all(idx.numel() == 50 for idx in kept.indices[0])


@pytest.mark.parametrize("fields, field", [
    ({"scorer": "none", "vector": "on"}, "vector"),
    ({"scorer": "keydiff", "vector_share": 0.1}, "vector_share"),
    ({"scorer": "keydiff", "vector": "on", "vector_share": 0.6}, "vector_share"),
    ({"scorer": "keydiff", "vector": "on", "granularity": "page"}, "vector"),
    ({"scorer": "keydiff", "vector": "on", "head_selection": "page"}, "vector"),
    ({"scorer": "keydiff", "vector": True}, "vector"),
    ({"scorer": "keydiff", "vector": "on", "vector_artifact": "/no/such/file"}, "vector_artifact"),
])
def test_settings_vector_cannot_run_with_are_refused(fields, field):
    with pytest.raises(EvictionConfigError) as info:
        EvictionConfig.from_fields(**fields)
    assert info.value.field == field


def test_vector_means_head_granularity_and_single_tokens():
    config = EvictionConfig(scorer="tova", budget=0.1, vector="on")  # uniform: page without vector
    assert config.resolved_granularity == "head" and config.head_selection_for(16) == "token"
    flat = EvictionConfig.from_flat({"kv_eviction": "keydiff", "kv_vector": "on", "kv_vector_share": "0.05"})
    assert flat.vector == "on" and flat.vector_share == 0.05
