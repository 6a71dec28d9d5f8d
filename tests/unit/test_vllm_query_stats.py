"""Pre-RoPE query statistics for expected_attention: un-rotation and exact mean/covariance."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from vllm_kvevict.vllm.backends.query_stats import QueryStats, rope_cos_sin, unrotate


def _neox_rotary(head: int, max_pos: int, base: float = 10000.0):
    inv = 1.0 / (base ** (torch.arange(0, head, 2).float() / head))
    freqs = torch.outer(torch.arange(max_pos).float(), inv)
    cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    return SimpleNamespace(is_neox_style=True, rotary_dim=head, head_size=head, cos_sin_cache=cache)


def test_unrotate_inverts_hf_rope():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    rotary = _neox_rotary(16, 64)
    positions = torch.arange(5, 17)
    cos, sin = rope_cos_sin(rotary, positions)
    pre = torch.randn(12, 3, 16)  # [T, H, d]
    post, _ = apply_rotary_pos_emb(pre.transpose(0, 1)[None], pre.transpose(0, 1)[None], cos[None], sin[None])
    torch.testing.assert_close(unrotate(post[0].transpose(0, 1), cos, sin), pre, atol=1e-5, rtol=1e-5)


def test_synthetic_queries_have_the_prompt_statistics():
    torch.manual_seed(1)
    queries = torch.randn(300, 2, 8) * torch.linspace(0.5, 3, 8) + 1.5  # [n, H, d]
    stats = QueryStats(keep_raw=False)
    for chunk in queries.split(77):
        stats.add(chunk)
    points = stats.as_queries()  # [H, 16, d]
    ref = queries.transpose(0, 1).double()
    mean = ref.mean(1)
    cov = torch.einsum("hni,hnj->hij", ref - mean[:, None], ref - mean[:, None]) / ref.shape[1]
    got = points.double()
    got_mean = got.mean(1)
    got_cov = torch.einsum("hni,hnj->hij", got - got_mean[:, None], got - got_mean[:, None]) / got.shape[1]
    assert points.shape == (2, 16, 8)
    torch.testing.assert_close(got_mean, mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_cov, cov, atol=1e-4, rtol=1e-4)


def test_expected_attention_scores_match_with_synthetic_queries():
    """The scorer reads only the mean and covariance: synthetic points give the raw result."""
    from vllm_kvevict.config import EvictionConfig
    from vllm_kvevict.policies import build_policy
    from vllm_kvevict.policies.base import LayerInputs

    torch.manual_seed(2)
    L, d = 400, 16
    cfg = EvictionConfig(scorer="expected_attention", budget=0.2)
    sinks = cfg.resolved_sinks
    rotary = _neox_rotary(d, L + 600)
    cos, sin = rope_cos_sin(rotary, torch.arange(L, L + 512))
    keys, values = torch.randn(2, L, d), torch.randn(2, L, d)
    raw = torch.randn(4, L, d)
    stats = QueryStats(keep_raw=QueryStats.keeps_raw(L, sinks, d))
    assert not stats.keep_raw
    stats.add(raw[:, sinks:].transpose(0, 1))

    def scores(pre):
        inputs = LayerInputs(keys=keys, values=values, queries=raw[:, -8:], queries_pre_rope=pre, rope_cos=cos, rope_sin=sin)
        return build_policy(cfg, 32).score_layer(inputs)

    synthetic, exact = scores(stats.as_queries()), scores(raw)
    torch.testing.assert_close(synthetic.values[~exact.protected], exact.values[~exact.protected], atol=1e-5, rtol=1e-4)
    assert bool(exact.protected[0, 0]) and torch.equal(synthetic.protected, exact.protected)  # sinks
