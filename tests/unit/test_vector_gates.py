"""VECTOR's two gates: the relative residual (``vector_residual``) and the per-head R^2 gate
(``vector_min_r2``): what they choose, and how their settings are refused."""

from __future__ import annotations

import pytest
import torch

from vllm_kvevict.config import EvictionConfig, EvictionConfigError
from vllm_kvevict.policies.base import LayerInputs, LayerScores, Scorer
from vllm_kvevict.policies.vector import VectorResiduals, convertible_heads, plan_vector, split_routes
from vllm_kvevict.vllm import api, cli
from vllm_kvevict.vllm.api_types import wrong_type

SERVER = EvictionConfig(scorer="keydiff", budget=0.25, vector="on")


class _Flat(Scorer):
    def score(self, inputs: LayerInputs) -> LayerScores:
        hkv, L = inputs.keys.shape[0], inputs.keys.shape[1]
        return LayerScores(values=torch.zeros(hkv, L), protected=torch.zeros(hkv, L, dtype=torch.bool))


class _Artifact:
    """Reconstructs every value as zero: the residual is ``||v||^2``."""

    def residuals(self, layer, keys, values, positions):
        return (values.float() ** 2).sum(-1)


class _Source:
    def artifact(self):
        return _Artifact()


def _inputs(values):
    hkv, L, d = values.shape
    return LayerInputs(keys=torch.randn(hkv, L, d), values=values, queries=torch.randn(hkv, 1, d))


def test_relative_residual_divides_by_the_value_norm():
    values = torch.randn(2, 12, 4) * torch.arange(1, 13).view(1, -1, 1)
    absolute = VectorResiduals(_Flat(), _Source()).score(_inputs(values)).residuals
    relative = VectorResiduals(_Flat(), _Source(), relative=True).score(_inputs(values)).residuals
    assert torch.allclose(absolute, (values ** 2).sum(-1))
    assert torch.allclose(relative, torch.ones(2, 12))
    zero = VectorResiduals(_Flat(), _Source(), relative=True).score(_inputs(torch.zeros(1, 3, 4))).residuals
    assert torch.equal(zero, torch.zeros(1, 3))  # 0 / floor, never NaN


def _scores(hkv=3, L=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    protected = torch.zeros(hkv, L, dtype=torch.bool)
    protected[:, -4:] = True
    return LayerScores(values=torch.rand(hkv, L, generator=g), protected=protected,
                       residuals=torch.rand(hkv, L, generator=g))


def test_a_gated_head_keeps_its_whole_budget_whole():
    scores = _scores()
    budgets = torch.tensor([10, 10, 10])
    whole, key_only = split_routes(scores, budgets, ratio=0.5, convertible=torch.tensor([True, False, True]))
    plain, _ = split_routes(scores, budgets, ratio=0.0)
    assert key_only[0].sum() == 2 * 5 and key_only[2].sum() == 2 * 5 and not key_only[1].any()
    assert torch.equal(whole[1], plain[1]) and whole[1].sum() == 10
    assert torch.equal(split_routes(scores, budgets, 0.5, torch.ones(3, dtype=torch.bool))[1],
                       split_routes(scores, budgets, 0.5)[1])


def test_plan_vector_gates_heads_by_held_out_r2():
    class Art:
        derotate = torch.tensor([[True, False], [False, True]])
        r2 = torch.tensor([[[0.1, 0.7], [0.2, 0.9]], [[0.5, 0.6], [0.95, 0.3]]])

    gate = convertible_heads(Art(), 0.5)
    assert gate.tolist() == [[True, False], [True, False]]  # the chosen variant's R^2: 0.7, 0.2 / 0.5, 0.3
    config = EvictionConfig(scorer="keydiff", budget=0.25, vector="on", min_tokens=0, window=4)
    layers = [_scores(hkv=2, L=80, seed=s) for s in (1, 2)]
    kept = plan_vector(layers, config, 80, gate)
    for layer in range(2):
        assert kept.key_only[layer][0].numel() > 0 and kept.key_only[layer][1].numel() == 0
        assert kept.indices[layer][1].numel() == int(kept.head_budgets[layer][1])


def test_the_gates_are_off_by_default_and_read_with_vector_on_only():
    config = EvictionConfig(scorer="keydiff", budget=0.1, vector="on")
    assert config.vector_residual in ("absolute", "relative") and 0.0 <= config.vector_min_r2 <= 1.0
    EvictionConfig(scorer="keydiff", budget=0.1, vector="on", vector_residual="relative", vector_min_r2=0.5)


@pytest.mark.parametrize("fields, field, allowed", [
    ({"vector_residual": "relatve"}, "vector_residual", "absolute, relative"),
    ({"vector_residual": 1}, "vector_residual", "absolute, relative"),
    ({"vector_min_r2": 1.5}, "vector_min_r2", "[0, 1]"),
    ({"vector_min_r2": -0.1}, "vector_min_r2", "[0, 1]"),
    ({"vector_min_r2": True}, "vector_min_r2", "boolean"),
    ({"vector_min_r2": "high"}, "vector_min_r2", "[0, 1]"),
])
def test_bad_gate_values_are_refused_naming_the_field(fields, field, allowed):
    with pytest.raises(EvictionConfigError) as info:
        EvictionConfig.from_fields(scorer="keydiff", vector="on", **fields)
    assert info.value.field == field and allowed in str(info.value)


@pytest.mark.parametrize("fields, field", [
    ({"vector_residual": "relative" if EvictionConfig().vector_residual == "absolute" else "absolute"},
     "vector_residual"),
    ({"vector_min_r2": 0.9 if EvictionConfig().vector_min_r2 != 0.9 else 0.1}, "vector_min_r2"),
])
def test_a_gate_without_vector_on_is_refused(fields, field):
    with pytest.raises(EvictionConfigError) as info:
        EvictionConfig.from_fields(scorer="keydiff", **fields)
    assert info.value.field == field and "kv_vector on" in str(info.value)


def test_gates_per_request_and_as_flags():
    config = api.request_config({"kv_vector_residual": "relative", "kv_vector_min_r2": "0.5"}, SERVER)
    assert config.vector_residual == "relative" and config.vector_min_r2 == 0.5
    with pytest.raises(EvictionConfigError) as info:
        api.request_config({"kv_vector_residual": "l2"}, SERVER)
    assert info.value.field == "kv_vector_residual" and "absolute, relative" in str(info.value)
    with pytest.raises(EvictionConfigError) as info:
        api.request_config({"kv_vector_min_r2": 2}, SERVER)
    assert info.value.field == "kv_vector_min_r2" and "[0, 1]" in str(info.value)
    assert wrong_type({"kv_vector_residual": 1})[0] == "kv_vector_residual"
    assert wrong_type({"kv_vector_min_r2": True})[0] == "kv_vector_min_r2"
    assert wrong_type({"kv_vector_residual": "relative", "kv_vector_min_r2": 0.5}) is None
    assert cli.parse_flag_value("kv_vector_residual", "relative") == "relative"
    assert cli.parse_flag_value("kv_vector_min_r2", "0.4") == 0.4
