"""Scorers on hand-computed toys: each expected number is worked out in the comment beside it."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies import SCORERS, LayerInputs, LayerScores, build_policy, build_scorer, compute_kept

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # one torch thread: see conftest


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Every test here runs with one torch thread (see conftest)."""

def scored(layer: LayerInputs, **fields) -> LayerScores:
    """The config's scorer's token scores (window and sinks protected)."""
    return build_scorer(EvictionConfig(**fields)).score(layer)


def kept(layer: LayerInputs, **fields) -> list[list[int]]:
    config = EvictionConfig(**fields)
    return [idx.tolist() for idx in compute_kept([layer], config).indices[0]]


def one_head_layer(log_weights: list[float], values: list[float] | None = None, wo: float = 1.0) -> LayerInputs:
    """1 KV head, 1 query head, d = 1, scale 1: the last query (q = 1) has logits ``k_j``."""
    keys = torch.tensor(log_weights).view(1, -1, 1)
    vals = torch.tensor(values if values is not None else [1.0] * len(log_weights)).view(1, -1, 1)
    return LayerInputs(keys=keys, values=vals, queries=torch.ones(1, 1, 1), scale=1.0, o_proj=torch.tensor([[wo]]))


def test_knorm_on_three_keys():
    keys = torch.tensor([[[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]]])  # norms 5, 1, 2
    layer = LayerInputs(keys=keys, values=keys.clone(), queries=torch.zeros(1, 1, 2))
    scores = scored(layer, scorer="knorm", window=0)
    assert torch.allclose(scores.values, torch.tensor([[-5.0, -1.0, -2.0]]))
    assert not scores.protected.any()
    # budget 2, window 1: the last position, then the smallest key (position 1).
    assert kept(layer, scorer="knorm", budget=2, window=1, allocation="uniform") == [[1, 2]]


def test_keydiff_anchor_is_mean_unit_key():
    keys = torch.tensor([[[2.0, 0.0], [1.0, 0.0], [0.0, 3.0]]])  # unit keys e1, e1, e2
    layer = LayerInputs(keys=keys, values=keys.clone(), queries=torch.zeros(1, 1, 2))
    # anchor = (2/3, 1/3): cos with e1 = 2/sqrt(5), with e2 = 1/sqrt(5)
    expected = -torch.tensor([[2.0, 2.0, 1.0]]) / math.sqrt(5.0)
    assert torch.allclose(scored(layer, scorer="keydiff").values, expected, atol=1e-6)


def test_snapkv_one_head_toy_without_and_with_pooling():
    # exp(k) = 1, 3, 2, 1: the last query's attention is 1/7, 3/7, 2/7 on the candidates.
    layer = one_head_layer([0.0, math.log(3.0), math.log(2.0), 0.0])
    raw = scored(layer, scorer="snapkv", window=1, pooling_kernel=1)
    assert torch.allclose(raw.values[0, :3], torch.tensor([1.0, 3.0, 2.0]) / 7, atol=1e-6)
    assert raw.protected.tolist() == [[False, False, False, True]]
    # avg-pool 3, zero padding counted: (0 + 1 + 3)/21, (1 + 3 + 2)/21, (3 + 2 + 0)/21
    pooled = scored(layer, scorer="snapkv", window=1, pooling_kernel=3)
    assert torch.allclose(pooled.values[0, :3], torch.tensor([4.0, 6.0, 5.0]) / 21, atol=1e-6)
    # max-pool 3: max(1,3), max(1,3,2), max(3,2) over 7
    maxed = scored(layer, scorer="snapkv", window=1, pooling_kernel=3, pooling="max")
    assert torch.allclose(maxed.values[0, :3], torch.tensor([3.0, 3.0, 3.0]) / 7, atol=1e-6)
    assert kept(layer, scorer="snapkv", budget=2, window=1, pooling_kernel=1, allocation="uniform") == [[1, 3]]


def test_snapkv_averages_the_query_heads_of_a_group():
    # 2 query heads share one KV head; head 0 prefers key 0, head 1 key 1 (both logits log 3).
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])
    queries = torch.tensor([[[math.log(3.0), 0.0]], [[0.0, math.log(3.0)]]])
    layer = LayerInputs(keys=keys, values=keys.clone(), queries=queries, scale=1.0)
    scores = scored(layer, scorer="snapkv", window=1, pooling_kernel=1)
    # head 0: (3, 1, 1)/5, head 1: (1, 3, 1)/5 -> mean (2/5, 2/5)
    assert torch.allclose(scores.values[0, :2], torch.tensor([0.4, 0.4]), atol=1e-6)


def test_window_attention_is_causal_inside_the_window():
    # Window of 2 over 3 keys: the first window query (position 1) must not see key 2.
    keys = torch.tensor([[[0.0], [0.0], [100.0]]])
    layer = LayerInputs(keys=keys, values=keys.clone(), queries=torch.ones(1, 2, 1), scale=1.0)
    scores = scored(layer, scorer="snapkv", window=2, pooling_kernel=1)
    # query 1 sees keys 0, 1 equally (1/2 on key 0); query 2 puts ~0 on key 0: mean = 1/4
    assert torch.allclose(scores.values[0, 0], torch.tensor(0.25), atol=1e-6)


def test_tova_last_query_mean_over_all_heads_same_for_every_kv_head():
    keys = torch.tensor([[[0.0], [math.log(3.0)], [0.0]], [[math.log(3.0)], [0.0], [0.0]]])  # 2 KV heads
    layer = LayerInputs(keys=keys, values=keys.clone(), queries=torch.ones(2, 1, 1), scale=1.0)
    scores = scored(layer, scorer="tova", window=1)
    # head 0: (1, 3, 1)/5, head 1: (3, 1, 1)/5 -> mean over heads (2, 2)/5 for both KV heads
    assert torch.allclose(scores.values[:, :2], torch.full((2, 2), 0.4), atol=1e-6)
    assert scores.protected.tolist() == [[False, False, True]] * 2
    assert build_scorer(EvictionConfig(scorer="tova", window=1)).needs.window == 1


def test_streamingllm_keeps_sinks_and_recent():
    length = 20
    layer = LayerInputs(keys=torch.randn(2, length, 4), values=torch.randn(2, length, 4), queries=torch.randn(2, 2, 4))
    result = kept(layer, scorer="streamingllm", budget=10, window=2)
    assert result == [[0, 1, 2, 3, *range(14, 20)]] * 2


def test_h2o_heavy_hitters_plus_recent_half():
    length = 10
    attention_sum = torch.tensor([[5.0, 0.0, 9.0, 1.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    layer = LayerInputs(
        keys=torch.zeros(1, length, 2), values=torch.zeros(1, length, 2), queries=torch.zeros(1, 1, 2),
        attention_sum=attention_sum,
    )
    # B = 6: recent half = last 3 positions, heavy hitters = 2, 0, 4
    assert kept(layer, scorer="h2o", budget=6, window=1) == [[0, 2, 4, 7, 8, 9]]


def test_expected_attention_formula_on_a_toy():
    # d = 2, identity RoPE (cos 1, sin 0), no sinks. Pre-RoPE queries (0,0), (2,0):
    # mu = (1, 0), Sigma = diag(1, 0). logit(k) = mu.k/sqrt(2) + k^T Sigma k / (2*2).
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]]])
    values = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]]])  # norms 1, 2, 5
    layer = LayerInputs(
        keys=keys, values=values, queries=torch.zeros(1, 1, 2),
        queries_pre_rope=torch.tensor([[[0.0, 0.0], [2.0, 0.0]]]),
        rope_cos=torch.ones(4, 2), rope_sin=torch.zeros(4, 2),
    )
    logits = torch.tensor([1 / math.sqrt(2) + 1 / 4, 0.0, 2 / math.sqrt(2) + 4 / 4])
    expected = torch.softmax(logits, 0) * torch.tensor([1.0, 2.0, 5.0])
    scores = scored(layer, scorer="expected_attention", sinks=0, window=0)
    assert torch.allclose(scores.values[0], expected, atol=1e-6)
    assert not scores.protected.any()
    # with 1 sink the first position is protected and the softmax runs over the other two
    with_sink = scored(layer, scorer="expected_attention", sinks=1, window=0)
    assert with_sink.protected.tolist() == [[True, False, False]]
    assert torch.allclose(with_sink.values[0, 1:], torch.softmax(logits[1:], 0) * torch.tensor([2.0, 5.0]), atol=1e-6)


def test_criticalkv_two_stages_on_a_toy():
    # exp(k) = 4, 3, 2, 1, 1 | 1 (window): candidate attention (4, 3, 2, 1, 1)/12.
    # budget 4, window 1, rho 0.5 -> stage 1: int(4 * 0.5) = 2 = window + best candidate (0).
    # stage 2: (a + 1e-4) * |v * wo|: j1 3/12*0.1, j2 2/12*1, j3 1/12*10, j4 1/12*1 -> j3, j2.
    layer = one_head_layer([math.log(w) for w in (4, 3, 2, 1, 1, 1)], values=[1, 0.1, 1, 10, 1, 1])
    fields = dict(budget=4, window=1, pooling_kernel=1, allocation="uniform")
    assert kept(layer, scorer="snapkv", **fields) == [[0, 1, 2, 5]]
    assert kept(layer, scorer="criticalkv", **fields) == [[0, 2, 3, 5]]
    # rho = 1: stage 1 takes the whole budget, so CriticalKV = SnapKV
    assert kept(layer, scorer="criticalkv", rho=1.0, **fields) == [[0, 1, 2, 5]]


def test_criticalkv_epsilon_swamps_attention_far_below_it():
    # exp(k) = 1e6, 30, 10, 1, 1 | 1 (window): a = (1e6, 30, 10, 1, 1)/S, S = 1e6 + 43, so
    # a1 ~ 3e-5, a2 ~ 1e-5, a3 = a4 ~ 1e-6, all below eps = 1e-4. Values 1 except j3 = 2.
    # budget 3, rho 0.5 -> stage 1: int(1.5) = 1 = the window; stage 2 picks two of j0..j4.
    # eps = 1e-4: j0 ~ 1, then j3 (1e-6 + 1e-4) * 2 beats j1 (3e-5 + 1e-4) * 1 -> value norm decides.
    # eps = 0: j1 3e-5 beats j3 2e-6 -> attention decides, as snapkv does.
    layer = one_head_layer([math.log(w) for w in (1e6, 30, 10, 1, 1, 1)], values=[1, 1, 1, 2, 1, 1])
    fields = {"budget": 3, "window": 1, "pooling_kernel": 1, "allocation": "uniform", "granularity": "head"}
    assert kept(layer, scorer="snapkv", **fields) == [[0, 1, 5]]
    assert kept(layer, scorer="criticalkv", epsilon=1e-4, **fields) == [[0, 3, 5]]
    assert kept(layer, scorer="criticalkv", **fields) == [[0, 1, 5]]  # default eps = 0


def test_criticalkv_value_term_is_l1_through_wo():
    from vllm_kvevict.policies.ops import value_l1_norm

    values = torch.tensor([[[1.0, -2.0]]])
    o_proj = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -3.0]])  # [D=3, H*d=2]
    layer = LayerInputs(keys=torch.zeros(1, 1, 2), values=values, queries=torch.zeros(1, 1, 2), o_proj=o_proj)
    # v @ o_proj.T = (1, -1, 6) -> L1 = 8
    assert torch.allclose(value_l1_norm(layer), torch.tensor([[8.0]]))


def test_laprox_layer_scores_sum_to_one():
    torch.manual_seed(0)
    layer = LayerInputs(
        keys=torch.randn(2, 30, 8), values=torch.randn(2, 30, 8), queries=torch.randn(4, 4, 8), o_proj=torch.randn(16, 32)
    )
    scores = scored(layer, scorer="laprox", window=4)
    assert scores.protected[:, -4:].all() and not scores.protected[:, :-4].any()
    assert torch.allclose(scores.values[:, :-4].sum(), torch.tensor(1.0), atol=1e-5)
    assert torch.all(scores.values[:, :-4] >= 0)


def test_value_aware_single_token_change():
    # One candidate holding attention P = 1/2 with value 0, window token value 2 (d = 1, wo = 1):
    # a = 1, removing the candidate moves the output by P/(1-P) * |a - v| = 1.
    layer = one_head_layer([0.0, 0.0], values=[0.0, 2.0])
    scores = scored(layer, scorer="value_aware", window=1)
    assert torch.allclose(scores.values[0, 0], torch.tensor(1.0), atol=1e-6)


def test_defensivekv_stage1_lifts_the_attention_core():
    from vllm_kvevict.policies.scorers.defensivekv import stage1_mask

    attention = torch.tensor([[1.0, 0.1, 0.6, 0.2, 0.1]])  # shares .5 .05 .3 .1 .05
    # sorted shares .5 .3 .1 .05: cumulative .5 .8 .9 .95 -> the two tokens before .85 is reached
    assert stage1_mask(attention, 0.85, limit=10).tolist() == [[True, False, True, False, False]]
    assert stage1_mask(attention, 0.85, limit=1).tolist() == [[True, False, False, False, False]]
    assert stage1_mask(attention, 0.92, limit=10).tolist() == [[True, False, True, True, False]]


def test_none_scores_zero_and_every_scorer_is_registered():
    from vllm_kvevict.config import SCORERS as CONFIG_SCORERS

    assert set(CONFIG_SCORERS) - {"none"} == set(SCORERS)
    layer = LayerInputs(keys=torch.randn(2, 5, 4), values=torch.randn(2, 5, 4), queries=torch.randn(2, 1, 4))
    scores = build_policy(EvictionConfig(), 16).score_layer(layer)
    assert torch.equal(scores.values, torch.zeros(2, 5)) and not scores.protected.any()


def test_expected_attention_needs_query_statistics():
    layer = LayerInputs(keys=torch.randn(1, 8, 4), values=torch.randn(1, 8, 4), queries=torch.randn(1, 1, 4))
    with pytest.raises(ValueError, match="queries_pre_rope"):
        scored(layer, scorer="expected_attention")


def test_keydiff_blockwise_one_block_equals_one_shot_and_keeps_b_per_head():
    from vllm_kvevict.policies import Protected, plan_kept
    from vllm_kvevict.policies.scorers import KeyDiff
    from vllm_kvevict.policies.scorers.keydiff import blockwise_kept

    generator = torch.Generator().manual_seed(4)
    keys = torch.randn(2, 60, 8, generator=generator)
    config = EvictionConfig(scorer="keydiff", budget=20, window=2, allocation="uniform")
    layer = LayerInputs(keys=keys, values=keys.clone(), queries=torch.zeros(2, 1, 8))

    def kept_with(block_size):
        keydiff = KeyDiff(block_size=block_size, budget=config.budget_tokens)
        scores = Protected(keydiff, window=config.window, sinks=0).score(layer)
        return plan_kept([scores], config, 60).indices[0], scores

    one_shot, _ = kept_with(None)
    single_block, _ = kept_with(40)  # B = 20, then one block of 40
    assert all(torch.equal(a, b) for a, b in zip(one_shot, single_block))
    assert [idx.tolist() for idx in one_shot] == [idx.tolist() for idx in compute_kept([layer], config).indices[0]]
    iterative = blockwise_kept(keys, 20, 8)
    assert iterative.shape == (2, 20)
    _, scores = kept_with(8)
    assert scores.preferred.sum(-1).tolist() == [20, 20]
    for g in range(2):
        assert set(iterative[g].tolist()) == set(torch.nonzero(scores.preferred[g]).flatten().tolist())
    with pytest.raises(ValueError, match="budget"):
        KeyDiff(block_size=8)


def test_criticalkv_wraps_the_base_the_config_names():
    from vllm_kvevict.policies import Allocation, rank
    from vllm_kvevict.policies.ops import value_l1_norm
    from vllm_kvevict.policies.scorers import H2O, CriticalKV, KNorm

    generator = torch.Generator().manual_seed(5)
    layer = LayerInputs(
        keys=torch.randn(2, 40, 4, generator=generator), values=torch.randn(2, 40, 4, generator=generator),
        queries=torch.randn(4, 2, 4, generator=generator), o_proj=torch.randn(6, 16, generator=generator),
    )
    fields = dict(scorer="criticalkv", criticalkv_base="knorm", budget=0.5, min_tokens=0, window=2)  # floor off: 40 tokens
    uniform = build_scorer(EvictionConfig(**fields, allocation="uniform"))
    assert isinstance(uniform.inner, CriticalKV) and isinstance(uniform.inner.base.inner, KNorm)
    base = build_scorer(EvictionConfig(**fields), "knorm").score(layer)
    scores = uniform.score(layer)
    assert torch.equal(scores.values, base.values * value_l1_norm(layer))  # epsilon 0
    assert torch.equal(scores.protected, base.protected) and scores.head_budgets.tolist() == [20, 20]
    # stage 1: each head's top int(0.5 * 40 * 0.5) = 10 by the base score (window included)
    assert torch.equal(scores.preferred | scores.protected, rank(base) < 10)
    adakv = build_scorer(EvictionConfig(**fields, allocation="adakv")).score(layer)
    allocation = Allocation(EvictionConfig(**fields, allocation="adakv"))
    assert torch.equal(adakv.head_budgets, allocation.split_layer(base, layer))
    assert build_scorer(EvictionConfig(**fields, allocation="global")).score(layer).head_budgets is None
    over_h2o = build_scorer(EvictionConfig(**{**fields, "criticalkv_base": "h2o"}))
    assert isinstance(over_h2o.inner.base.inner, H2O)
    assert over_h2o.needs.attention_sums and over_h2o.needs.o_proj
