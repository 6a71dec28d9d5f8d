"""policies/held.py: held tokens scored head by head on their positions, planned among them."""

from __future__ import annotations

import pytest
import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies import build_policy
from vllm_kvevict.policies.held import held_layer_scores, plan_held

HKV, G, D, BS = 2, 2, 8, 4


def _held(seq_len: int):
    """Head 0 holds runs 0, 2 and the tail from 12; head 1 runs 1, 2 and the tail."""
    tail = torch.arange(12, seq_len)
    return [torch.cat([torch.arange(0, 4), torch.arange(8, 12), tail]),
            torch.cat([torch.arange(4, 12), tail])]


def _scores(policy, held, seq_len, seed=0):
    gen = torch.Generator().manual_seed(seed)
    keys = [torch.randn(h.numel(), D, generator=gen) for h in held]
    values = [torch.randn(h.numel(), D, generator=gen) for h in held]
    queries = torch.randn(HKV * G, 4, D, generator=gen)
    return held_layer_scores(policy, keys, values, held, queries, seq_len, layer_idx=0, num_layers=1, scale=None), \
        (keys, values, queries)


@pytest.mark.parametrize("selection", ["page", "token"])
def test_each_head_is_scored_alone_and_keeps_only_what_it_holds(selection):
    cfg = EvictionConfig.from_flat({"kv_eviction": "snapkv", "kv_budget": 12, "kv_window": 4, "kv_decode_interval": 8,
                                    "kv_head_selection": selection})
    policy = build_policy(cfg, BS)
    held = _held(24)
    scores, (keys, values, queries) = _scores(policy, held, 24)
    assert scores.values.shape == (HKV, 24)
    for g, h in enumerate(held):
        assert torch.isfinite(scores.values[g, h]).all()
        outside = torch.ones(24, dtype=torch.bool)
        outside[h] = False
        assert torch.isinf(scores.values[g, outside]).all() and not scores.protected[g, outside].any()
        from vllm_kvevict.policies.base import LayerInputs

        alone = policy.score_layer(LayerInputs(keys=keys[g][None], values=values[g][None],
                                               queries=queries[g * G : (g + 1) * G], positions=h))
        assert torch.equal(scores.values[g, h], alone.values[0])  # nothing of the other head is read
        assert scores.protected[g, 20:].all()  # the window: the last 4 positions
    kept = plan_held(policy, [scores], 24, [held])
    for k, h in zip(kept.indices[0], held):
        assert torch.isin(k, h).all() and k.numel() < h.numel()
    assert int(kept.head_budgets.sum()) <= HKV * 12 + HKV * BS


def test_a_budget_of_the_whole_length_keeps_what_is_held_and_a_head_over_its_holding_is_refused():
    cfg = EvictionConfig.from_flat({"kv_eviction": "snapkv", "kv_budget": 100, "kv_window": 4, "kv_decode_interval": 8,
                                    "kv_head_selection": "token"})
    policy = build_policy(cfg, BS)
    held = _held(24)
    scores, _ = _scores(policy, held, 24)
    kept = plan_held(policy, [scores], 24, [held])  # the plan keeps every position: each head what it holds
    assert all(torch.equal(k, h) for k, h in zip(kept.indices[0], held))
    uniform = EvictionConfig.from_flat({"kv_eviction": "snapkv", "kv_budget": 18, "kv_window": 4,
                                        "kv_decode_interval": 8, "kv_allocation": "uniform", "kv_granularity": "head",
                                        "kv_head_selection": "token"})
    policy = build_policy(uniform, BS)
    held = [torch.arange(12, 24), torch.arange(4, 24)]  # head 0 holds 12 < its uniform 18
    scores, _ = _scores(policy, held, 24)
    with pytest.raises(ValueError, match="layer 0 head 0 keeps 18 tokens, not all of its 12 held ones"):
        plan_held(policy, [scores], 24, [held])


def test_criticalkv_reads_each_heads_group_of_o_proj_and_equals_the_layers_page_score_when_all_hold_all():
    """Whole pages per head: every head holding every position scores as the whole layer does
    (value norms from the columns of its group's heads only; to rounding: shapes differ)."""
    from vllm_kvevict.policies.base import LayerInputs

    cfg = EvictionConfig.from_flat({"kv_eviction": "criticalkv", "kv_budget": 12, "kv_window": 4,
                                    "kv_decode_interval": 8, "kv_head_selection": "page"})
    policy = build_policy(cfg, BS)
    seq_len, model_dim = 24, 16
    gen = torch.Generator().manual_seed(3)
    keys, values = torch.randn(HKV, seq_len, D, generator=gen), torch.randn(HKV, seq_len, D, generator=gen)
    queries, o_proj = torch.randn(HKV * G, 4, D, generator=gen), torch.randn(model_dim, HKV * G * D, generator=gen)
    held = [torch.arange(seq_len)] * HKV
    per_head = held_layer_scores(policy, list(keys), list(values), held, queries, seq_len, layer_idx=0, num_layers=1,
                                 scale=None, o_proj=o_proj)
    layer = policy.score_layer(LayerInputs(keys=keys, values=values, queries=queries, o_proj=o_proj))
    assert torch.allclose(per_head.values, layer.values, rtol=1e-5, atol=0)
    assert torch.equal(per_head.protected, layer.protected)
    o_proj[:, :G * D] = 0  # head 0's group: its value norms vanish, head 1's scores do not move
    changed = held_layer_scores(policy, list(keys), list(values), held, queries, seq_len, layer_idx=0, num_layers=1,
                                scale=None, o_proj=o_proj)
    assert torch.equal(changed.values[1], per_head.values[1]) and not torch.equal(changed.values[0], per_head.values[0])
    with pytest.raises(ValueError, match="o_proj"):
        held_layer_scores(policy, list(keys), list(values), held, queries, seq_len, layer_idx=0, num_layers=1,
                          scale=None)
