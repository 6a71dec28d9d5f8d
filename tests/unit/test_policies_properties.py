"""Invariants of every registered scorer x allocator on random inputs."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies import (
    ALLOCATORS,
    SCORERS,
    LayerInputs,
    LayerScores,
    build_scorer,
    compute_kept,
    global_layer_cap,
    plan_kept,
    pyramid_layer_budget,
    window_and_sinks,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # one torch thread: see conftest


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Every test here runs with one torch thread (see conftest)."""

NUM_LAYERS, HKV, GROUP, DIM, LENGTH, WINDOW, SINKS, HIDDEN = 3, 2, 2, 8, 96, 8, 2, 24


def random_layer(layer_idx: int, generator: torch.Generator, length: int = LENGTH) -> LayerInputs:
    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    heads = HKV * GROUP
    angles = randn(16, DIM // 2).repeat(1, 2)
    return LayerInputs(
        keys=randn(HKV, length, DIM),
        values=randn(HKV, length, DIM),
        queries=randn(heads, WINDOW, DIM),
        o_proj=randn(HIDDEN, heads * DIM),
        layer_idx=layer_idx,
        num_layers=NUM_LAYERS,
        queries_pre_rope=randn(heads, length, DIM),
        rope_cos=angles.cos(),
        rope_sin=angles.sin(),
        attention_sum=randn(heads, length).abs(),
    )


@pytest.fixture(scope="module")
def layers() -> list[LayerInputs]:
    generator = torch.Generator().manual_seed(7)
    return [random_layer(layer, generator) for layer in range(NUM_LAYERS)]


#: Policies that need no trained artifact (``lkv`` reads one made for a model: its invariants run in
#: tests/unit/test_lkv_policies.py with a random artifact).
NO_ARTIFACT_SCORERS = sorted(set(SCORERS) - {"lkv"})
NO_ARTIFACT_ALLOCATORS = sorted(set(ALLOCATORS) - {"lkv"})


def config_for(scorer: str, allocation: str, budget) -> EvictionConfig:
    return EvictionConfig(scorer=scorer, allocation=allocation, budget=budget, min_tokens=0, window=WINDOW, sinks=SINKS)


def assert_kept_first(scores: LayerScores, head: int, kept: torch.Tensor) -> None:
    """The head's kept tokens precede its evicted ones: protected, then preferred, then by value."""
    evicted = torch.ones(scores.seq_len, dtype=torch.bool)
    evicted[kept] = False
    if not evicted.any():
        return
    tier = scores.protected[head].to(torch.int64) * 2
    if scores.preferred is not None:
        tier = tier + (scores.preferred[head] & ~scores.protected[head]).to(torch.int64)
    lowest_kept, highest_evicted = int(tier[kept].min()), int(tier[evicted].max())
    assert lowest_kept >= highest_evicted, "a lower tier kept over a higher one"
    if lowest_kept == highest_evicted and lowest_kept < 2:
        values = scores.values[head]
        on_tier = tier == lowest_kept
        assert values[kept][on_tier[kept]].min() >= values[evicted][on_tier[evicted]].max(), "kept = the head's top"


@pytest.mark.parametrize("budget", [0.4, 30])
@pytest.mark.parametrize("allocation", NO_ARTIFACT_ALLOCATORS)
@pytest.mark.parametrize("scorer", NO_ARTIFACT_SCORERS)
def test_kept_set_invariants(layers, scorer, allocation, budget):
    config = config_for(scorer, allocation, budget)
    kept = compute_kept(layers, config)
    mean_budget = config.budget_tokens(LENGTH)
    assert kept.head_budgets.shape == (NUM_LAYERS, HKV)
    protected = set(range(SINKS)) | set(range(LENGTH - WINDOW, LENGTH))
    for layer, (indices, budgets, scores) in enumerate(zip(kept.indices, kept.head_budgets, kept.scores)):
        for head, idx in enumerate(indices):
            assert len(idx) == int(budgets[head])
            assert torch.all(idx[1:] > idx[:-1]), "sorted and unique"
            assert 0 <= int(idx[0]) and int(idx[-1]) < LENGTH
            assert protected <= set(idx.tolist())
            assert_kept_first(scores, head, idx)
        if allocation in ("uniform", "adakv", "adakv_floor"):
            assert int(budgets.sum()) == HKV * mean_budget
        if allocation == "pyramid":
            expected = pyramid_layer_budget(layer, NUM_LAYERS, LENGTH, config)
            assert budgets.tolist() == [expected] * HKV
        if allocation == "global":
            assert int(budgets.sum()) <= HKV * global_layer_cap(mean_budget, LENGTH)
    if allocation == "global":
        assert kept.kept_tokens() == NUM_LAYERS * HKV * mean_budget


@pytest.mark.parametrize("scorer", NO_ARTIFACT_SCORERS)
def test_budget_one_keeps_everything(layers, scorer):
    kept = compute_kept(layers, EvictionConfig(scorer=scorer, budget=1.0, window=WINDOW))
    assert torch.all(kept.head_budgets == LENGTH)
    assert all(torch.equal(idx, torch.arange(LENGTH)) for heads in kept.indices for idx in heads)


def test_token_budget_at_least_the_prompt_keeps_everything(layers):
    kept = compute_kept(layers, EvictionConfig(scorer="snapkv", budget=LENGTH + 10, window=WINDOW))
    assert torch.all(kept.head_budgets == LENGTH)


@pytest.mark.parametrize("allocation", ["uniform", "adakv", "adakv_floor", "pyramid"])
def test_criticalkv_head_budgets_come_from_the_base_score(layers, allocation):
    """kvpress's CriticalAdaKV: budgets are allocated on the SnapKV score, stage 2 only re-ranks."""
    critical = compute_kept(layers, config_for("criticalkv", allocation, 0.4))
    base = compute_kept(layers, config_for("snapkv", allocation, 0.4))
    assert torch.equal(critical.head_budgets, base.head_budgets)


def test_pyramid_budgets_shrink_with_depth_and_average_to_the_budget():
    generator = torch.Generator().manual_seed(3)
    length, num_layers = 1000, 5
    layers = [random_layer(layer, generator, length) for layer in range(num_layers)]
    for layer in layers:
        layer.num_layers = num_layers
    config = EvictionConfig(scorer="knorm", allocation="pyramid", budget=0.4, min_tokens=0, window=WINDOW)
    budgets = compute_kept(layers, config).head_budgets[:, 0]
    assert torch.all(budgets[1:] < budgets[:-1])
    assert abs(int(budgets.sum()) - num_layers * 400) <= num_layers
    # first layer 2B - B/beta, last B/beta (beta = 20)
    assert budgets[0] == 780 and budgets[-1] == 20


def test_global_respects_the_layer_cap_when_one_layer_dominates():
    length, hkv = 64, 2
    peaked = torch.zeros(hkv, length)
    peaked[:, :40] = torch.linspace(10, 5, 40)
    flat = torch.full((hkv, length), 0.01)
    config = EvictionConfig(scorer="laprox", allocation="global", budget=16, window=4)
    ends = window_and_sinks(length, config.window, config.resolved_sinks)
    scores = [LayerScores.unprotected(s).protect(ends) for s in (peaked, flat, flat)]
    kept = plan_kept(scores, config, length)
    cap = global_layer_cap(16, length)
    assert cap == 32
    assert int(kept.head_budgets[0].sum()) == hkv * cap
    assert kept.kept_tokens() == 3 * hkv * 16


def test_plan_rejects_scores_of_another_length(layers):
    scores = [build_scorer(config_for("knorm", "uniform", 0.4)).score(layer) for layer in layers]
    with pytest.raises(ValueError, match="seq_len"):
        plan_kept(scores, config_for("knorm", "uniform", 0.4), LENGTH + 1)


def test_window_covers_the_whole_prompt_keeps_everything():
    generator = torch.Generator().manual_seed(1)
    layer = random_layer(0, generator, length=WINDOW)
    kept = compute_kept([layer], EvictionConfig(scorer="snapkv", budget=0.5, min_tokens=0, window=WINDOW))
    assert all(len(idx) == WINDOW for idx in kept.indices[0])


def test_fraction_budget_rounds_down_like_kvpress():
    config = EvictionConfig(scorer="snapkv", budget=0.3, min_tokens=0, window=4)
    assert config.budget_tokens(97) == math.floor(97 * 0.3)
