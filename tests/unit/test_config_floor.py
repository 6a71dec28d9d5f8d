"""``min_tokens``: the floor of a fractional budget, through the one place budgets become tokens."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_kvevict.cache import compact_blocks_needed, layer_budget_bounds
from vllm_kvevict.config import DEFAULT_MIN_TOKENS, EvictionConfig, EvictionConfigError
from vllm_kvevict.policies import LayerScores, pages_per_head, plan_kept, pyramid_layer_budget, select_pages
from vllm_kvevict.policies.allocation import Allocation
from vllm_kvevict.policies.scorers.criticalkv import criticalkv

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(
    "budget, floor, prompt_len, expected",
    [
        (0.1, 128, 900, 128),  # 90 raised to the floor
        (0.1, 0, 900, 90),  # off: kvpress's int(L * budget)
        (0.1, 128, 2048, 204),  # the fraction is above the floor: it does not bind
        (0.1, 128, 100, 100),  # never more than the prompt
        (0.01, 16, 1000, 32),  # window + sinks stay the lower bound
        (0.2, 256, 1000, 256),
    ],
)
def test_budget_tokens_raise_a_fraction_to_the_floor(budget, floor, prompt_len, expected):
    config = EvictionConfig(scorer="snapkv", budget=budget, min_tokens=floor)
    assert config.budget_tokens(prompt_len) == expected
    assert config.budget_target(prompt_len) == max(prompt_len * budget, min(floor, prompt_len))


def test_a_token_budget_is_its_count_and_everything_kept_is_everything():
    assert EvictionConfig(scorer="snapkv", budget=64).budget_tokens(1000) == 64  # the default floor is not read
    assert EvictionConfig(scorer="snapkv", budget=64, min_tokens=0).budget_tokens(1000) == 64
    assert EvictionConfig(scorer="snapkv", budget=1.0, min_tokens=256).budget_tokens(100) == 100
    assert EvictionConfig().min_tokens == DEFAULT_MIN_TOKENS


@pytest.mark.parametrize("value", [-1, "abc", True, None, 1.5])
def test_bad_floor_names_kv_min_tokens(value):
    with pytest.raises(EvictionConfigError) as info:
        EvictionConfig.from_flat({"kv_eviction": "snapkv", "kv_budget": 0.1, "kv_min_tokens": value})
    assert info.value.field == "kv_min_tokens"
    with pytest.raises(EvictionConfigError) as info:
        EvictionConfig.from_additional_config({"kv_eviction": {"scorer": "snapkv", "min_tokens": value}})
    assert info.value.field == "kv_eviction.min_tokens"


def test_a_floor_named_with_a_token_budget_is_refused_not_ignored():
    with pytest.raises(EvictionConfigError, match="fractional budgets") as info:
        EvictionConfig.from_flat({"kv_eviction": "snapkv", "kv_budget": 256, "kv_min_tokens": 64})
    assert info.value.field == "kv_min_tokens"
    assert EvictionConfig.from_flat({"kv_eviction": "snapkv", "kv_budget": 256, "kv_min_tokens": 0}).budget == 256
    # a request's token budget on a server with a floor: the server's floor is not carried over
    server = EvictionConfig.from_flat({"kv_eviction": "snapkv", "kv_budget": 0.1, "kv_min_tokens": 64})
    request = EvictionConfig.from_flat({"kv_budget": 256}, base=server)
    assert request.budget_tokens(1000) == 256 and "min_tokens" not in request.model_fields_set
    assert EvictionConfig.from_flat({"kv_budget": 0.2}, base=server).min_tokens == 64
    assert EvictionConfig.from_flat({"kv_min_tokens": "32"}, base=server).min_tokens == 32


ALLOCATION_CONFIGS = [
    dict(scorer="snapkv"),  # adakv
    dict(scorer="snapkv", allocation="adakv_floor"),
    dict(scorer="streamingllm"),  # uniform
    dict(scorer="criticalkv"),
    dict(scorer="pyramidkv"),  # pyramid
    dict(scorer="laprox"),  # global
    dict(scorer="snapkv", head_selection="token"),
]


@pytest.mark.parametrize("fields", ALLOCATION_CONFIGS, ids=lambda f: "-".join(map(str, f.values())))
@pytest.mark.parametrize("block_size", [16, 128])
def test_k_of_a_binding_floor_is_k_of_that_token_budget(fields, block_size):
    """The scheduler's compact region follows the floor: a fraction raised to 256 tokens sizes K
    (and every layer's bound) exactly as a budget of 256 tokens does."""
    floored = EvictionConfig(budget=0.1, min_tokens=256, **fields)
    tokens = EvictionConfig(budget=256, **fields)
    for prompt_len in (900, 1024, 2000):
        assert layer_budget_bounds(floored, prompt_len, 30) == layer_budget_bounds(tokens, prompt_len, 30)
        k = compact_blocks_needed(floored, prompt_len, block_size, 30, 3)
        assert k == compact_blocks_needed(tokens, prompt_len, block_size, 30, 3)
        assert k >= math.ceil(256 / block_size)
    assert compact_blocks_needed(floored, 4096, 16, 30, 3) == compact_blocks_needed(
        EvictionConfig(budget=0.1, min_tokens=0, **fields), 4096, 16, 30, 3)  # 409 > 256: not binding


def test_pyramid_schedule_and_pages_read_the_floor():
    config = EvictionConfig(scorer="pyramidkv", budget=0.1, min_tokens=256)
    per_layer = [pyramid_layer_budget(layer, 30, 900, config) for layer in range(30)]
    assert per_layer == [pyramid_layer_budget(layer, 30, 900, config.model_copy(update={"budget": 256}))
                         for layer in range(30)]
    assert sum(per_layer) / 30 == pytest.approx(256, abs=1)  # the schedule's mean is the floor
    pages = EvictionConfig(scorer="snapkv", budget=0.1, min_tokens=256)
    assert pages_per_head(pages, 900, 16) == 16
    kept = select_pages(torch.rand(math.ceil(900 / 16)), 900, 16, pages.model_copy(update={"allocation": "uniform"}))
    assert len(kept) >= 16


@pytest.mark.parametrize("fields", [dict(scorer="snapkv"), dict(scorer="streamingllm"), dict(scorer="laprox")])
def test_every_allocation_keeps_the_floor_per_head_on_average(fields):
    config = EvictionConfig(budget=0.1, min_tokens=128, **fields)
    gen = torch.Generator().manual_seed(0)
    layers = [LayerScores.unprotected(torch.rand(3, 900, generator=gen)) for _ in range(4)]
    kept = plan_kept(layers, config, 900)
    assert kept.kept_tokens() == 4 * 3 * 128
    assert [int(x.numel()) for x in kept.indices[0]] == kept.head_budgets[0].tolist()


@pytest.mark.parametrize("allocation", ["uniform", "global", "adakv"])
def test_criticalkv_stage_one_splits_the_floored_budget(allocation):
    config = EvictionConfig(scorer="criticalkv", budget=0.1, min_tokens=128, allocation=allocation)
    scorer = criticalkv(config)
    budgets = torch.full((3,), config.budget_tokens(900), dtype=torch.int64)
    assert scorer.stage1_counts(budgets, 900).tolist() == [64, 64, 64]  # int(128 * rho 0.5)
    assert Allocation(config).config.budget_tokens(900) == 128
