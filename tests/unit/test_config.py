"""EvictionConfig: one object for flags, additional_config and vllm_xargs; errors name the field."""

import pytest

from vllm_kvevict.config import (
    ALLOCATIONS,
    CRITICALKV_BASES,
    FLAT_KEYS,
    SCORERS,
    EvictionConfig,
    EvictionConfigError,
)


@pytest.mark.parametrize(
    "flat, field",
    [
        ({"kv_eviction": "bogus"}, "kv_eviction"),
        ({"kv_budget": 0}, "kv_budget"),
        ({"kv_budget": -1}, "kv_budget"),
        ({"kv_budget": 1.5}, "kv_budget"),
        ({"kv_budget": "abc"}, "kv_budget"),
        ({"kv_budget": True}, "kv_budget"),
        ({"kv_budget": float("nan")}, "kv_budget"),
        ({"kv_allocation": "lru"}, "kv_allocation"),
        ({"kv_granularity": "token"}, "kv_granularity"),
        ({"kv_eviction": "snapkv", "kv_budget": 16}, "kv_window"),  # window 32 > 16 tokens
        ({"kv_eviction": "snapkv", "kv_window": 0}, "kv_window"),
        ({"kv_pooling_kernel": 4}, "kv_pooling_kernel"),
        ({"kv_criticalkv_base": "criticalkv"}, "kv_criticalkv_base"),
        ({"kv_criticalkv_base": "none"}, "kv_criticalkv_base"),
        ({"kv_typo": 1}, "kv_typo"),
    ],
)
def test_bad_flat_values_name_the_field(flat, field):
    with pytest.raises(EvictionConfigError) as info:
        EvictionConfig.from_flat(flat)
    assert info.value.field == field
    assert str(info.value).startswith(f"invalid {field}=")


def test_error_lists_allowed_values():
    with pytest.raises(EvictionConfigError) as info:
        EvictionConfig.from_flat({"kv_eviction": "bogus"})
    for name in SCORERS:
        assert name in str(info.value)
    with pytest.raises(EvictionConfigError) as info:
        EvictionConfig.from_flat({"kv_allocation": "x"})
    for name in ALLOCATIONS:
        assert name in str(info.value)


def test_nested_form_names_the_nested_field():
    with pytest.raises(EvictionConfigError) as info:
        EvictionConfig.from_additional_config({"kv_eviction": {"scorer": "snapkv", "budget": 2.5}})
    assert info.value.field == "kv_eviction.budget"
    with pytest.raises(EvictionConfigError) as info:
        EvictionConfig.from_additional_config({"kv_eviction": {"scorr": "snapkv"}})
    assert info.value.field == "kv_eviction.scorr"


def test_other_keys_pass_through():
    cfg = EvictionConfig.from_flat({"kv_eviction": "snapkv", "kv_budget": "0.2", "temperature_hint": 3})
    assert cfg.scorer == "snapkv" and cfg.budget == pytest.approx(0.2)


def test_three_doors_agree():
    flat = EvictionConfig.from_flat({"kv_eviction": "criticalkv", "kv_budget": 0.1, "kv_window": 16})
    nested = EvictionConfig.from_additional_config({"kv_eviction": {"scorer": "criticalkv", "budget": 0.1, "window": 16}})
    fields = EvictionConfig.from_fields(scorer="criticalkv", budget=0.1, window=16)
    assert flat == nested == fields
    assert EvictionConfig.from_additional_config(flat.to_additional_config()) == flat
    assert EvictionConfig.from_flat(flat.to_flat()) == flat
    assert set(flat.to_flat()) <= set(FLAT_KEYS)


def test_absent_config_is_none():
    assert not EvictionConfig.from_additional_config(None).enabled
    assert not EvictionConfig.from_additional_config({"other_plugin": 1}).enabled


def test_defaults_per_scorer():
    assert EvictionConfig.from_fields(scorer="criticalkv").resolved_allocation == "adakv"
    assert EvictionConfig.from_fields(scorer="laprox").resolved_allocation == "global"
    assert EvictionConfig.from_fields(scorer="pyramidkv").resolved_allocation == "pyramid"
    assert EvictionConfig.from_fields(scorer="tova").resolved_allocation == "uniform"
    assert EvictionConfig.from_fields(scorer="streamingllm").resolved_sinks == 4
    assert EvictionConfig.from_fields(scorer="snapkv").resolved_sinks == 0
    assert EvictionConfig.from_fields(scorer="snapkv", allocation="uniform").resolved_allocation == "uniform"


def test_request_override_on_server_default():
    server = EvictionConfig.from_flat({"kv_eviction": "criticalkv", "kv_budget": 0.1, "kv_window": 16})
    req = EvictionConfig.from_flat({"kv_eviction": "streamingllm"}, base=server)
    assert (req.scorer, req.budget, req.window) == ("streamingllm", 0.1, 16)
    assert req.resolved_allocation == "uniform" and req.resolved_sinks == 4
    assert not EvictionConfig.from_flat({"kv_eviction": "none"}, base=server).enabled
    assert EvictionConfig.from_flat({}, base=server) == server


@pytest.mark.parametrize(
    "budget, prompt_len, expected",
    [(0.1, 2000, 200), (0.25, 999, 249), (1.0, 777, 777), (1, 50, 50), (256, 2000, 256), (256, 100, 100),
     (0.01, 1000, 32)],  # 0.01 * 1000 = 10 < window 32: the window is always kept
)
def test_budget_tokens(budget, prompt_len, expected):
    """kvpress's rounding with the floor off (test_config_floor.py: with it)."""
    assert EvictionConfig.from_fields(scorer="snapkv", budget=budget, min_tokens=0).budget_tokens(prompt_len) == expected


def test_budget_one_keeps_everything():
    assert EvictionConfig.from_fields(scorer="snapkv", budget=1.0).keeps_everything
    assert not EvictionConfig.from_fields(scorer="snapkv", budget=0.99).keeps_everything
    assert not EvictionConfig.from_fields(scorer="snapkv", budget=64).keeps_everything


def test_window_zero_only_for_scorers_without_window_attention():
    assert EvictionConfig.from_flat({"kv_eviction": "knorm", "kv_window": 0}).window == 0
    with pytest.raises(EvictionConfigError) as info:
        EvictionConfig.from_flat({"kv_eviction": "criticalkv", "kv_window": 0})
    assert info.value.field == "kv_window"


def test_granularity_defaults_to_head_for_per_head_allocations():
    for scorer in ("criticalkv", "snapkv", "defensivekv", "knorm", "keydiff", "expected_attention"):
        cfg = EvictionConfig(scorer=scorer, budget=0.1)
        assert (cfg.resolved_allocation, cfg.resolved_granularity) == ("adakv", "head"), scorer
    assert EvictionConfig(scorer="laprox", budget=0.1).resolved_granularity == "head"
    assert EvictionConfig(scorer="pyramidkv", budget=0.1).resolved_granularity == "head"
    for scorer in ("streamingllm", "tova", "h2o", "value_aware"):
        assert EvictionConfig(scorer=scorer, budget=0.1).resolved_granularity == "page", scorer
    assert EvictionConfig(scorer="snapkv", budget=0.1, allocation="uniform").resolved_granularity == "page"
    assert EvictionConfig(scorer="criticalkv", budget=0.1, granularity="page").resolved_granularity == "page"
    # a request changing the scorer gets that scorer's default granularity unless one was set
    base = EvictionConfig(scorer="streamingllm", budget=0.1)
    assert EvictionConfig.from_flat({"kv_eviction": "criticalkv"}, base=base).resolved_granularity == "head"
    with pytest.raises(EvictionConfigError, match="granularity"):
        EvictionConfig.from_flat({"kv_granularity": "token"})


def test_criticalkv_base_is_a_one_stage_scorer_snapkv_by_default():
    assert EvictionConfig(scorer="criticalkv").criticalkv_base == "snapkv"
    assert EvictionConfig.from_flat({"kv_eviction": "criticalkv", "kv_criticalkv_base": "tova"}).criticalkv_base == "tova"
    assert set(CRITICALKV_BASES) <= set(SCORERS) - {"none", "criticalkv", "defensivekv"}
    with pytest.raises(EvictionConfigError) as info:
        EvictionConfig.from_additional_config({"kv_eviction": {"scorer": "criticalkv", "criticalkv_base": "defensivekv"}})
    assert info.value.field == "kv_eviction.criticalkv_base"
    assert "snapkv" in info.value.allowed


@pytest.mark.parametrize("flat,field", [
    ({"kv_eviction": "snapkv", "kv_rho": 0.3}, "kv_rho"),
    ({"kv_eviction": "snapkv", "kv_epsilon": 1e-4}, "kv_epsilon"),
    ({"kv_eviction": "snapkv", "kv_criticalkv_base": "knorm"}, "kv_criticalkv_base"),
    ({"kv_eviction": "knorm", "kv_pooling_kernel": 7}, "kv_pooling_kernel"),
    ({"kv_eviction": "criticalkv", "kv_criticalkv_base": "knorm", "kv_pooling": "max"}, "kv_pooling"),
    ({"kv_eviction": "streamingllm", "kv_alpha": 0.5}, "kv_alpha"),
    ({"kv_eviction": "snapkv", "kv_granularity": "page", "kv_head_selection": "token"}, "kv_head_selection"),
])
def test_a_setting_the_policy_does_not_read_is_refused_not_ignored(flat, field):
    with pytest.raises(EvictionConfigError) as info:
        EvictionConfig.from_flat(flat)
    assert info.value.field == field and "not read by" in str(info.value) and "it applies to" in str(info.value)


def test_settings_read_by_the_policy_pass_and_a_new_scorer_drops_what_it_does_not_read():
    assert EvictionConfig.from_flat({"kv_eviction": "criticalkv", "kv_rho": 0.3, "kv_pooling": "max"}).rho == 0.3
    assert EvictionConfig.from_flat({"kv_eviction": "defensivekv", "kv_pooling_kernel": 7}).pooling_kernel == 7
    server = EvictionConfig.from_flat({"kv_eviction": "criticalkv", "kv_rho": 0.3, "kv_pooling_kernel": 7})
    request = EvictionConfig.from_flat({"kv_eviction": "snapkv"}, base=server)
    assert request.rho == 0.5 and request.pooling_kernel == 7  # snapkv reads the kernel, not rho
    with pytest.raises(EvictionConfigError, match="kv_rho"):
        EvictionConfig.from_flat({"kv_eviction": "snapkv", "kv_rho": 0.2}, base=server)  # named by the request
