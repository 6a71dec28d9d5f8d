"""The differentiable top-k: masks sum to the budget, harden to the top-k, carry the implicit gradient."""

from __future__ import annotations

import torch

from vllm_kvevict.lkv.soft_topk import soft_topk


def _inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(4, 60, generator=generator, dtype=torch.float64)
    candidates = torch.ones(4, 60, dtype=torch.bool)
    candidates[:, -10:] = False
    k = torch.tensor([3.0, 12.5, 25.0, 0.0], dtype=torch.float64)
    return scores, k, candidates


def test_masks_sum_to_the_budget_and_stay_on_the_candidates():
    scores, k, candidates = _inputs()
    masks = soft_topk(scores, k, candidates, temperature=0.3)
    assert torch.allclose(masks.sum(-1), k, atol=1e-6)
    assert torch.all((masks >= 0) & (masks <= 1)) and torch.all(masks[~candidates] == 0)


def test_cold_masks_are_the_hard_top_k():
    scores, _, candidates = _inputs(1)
    k = torch.tensor([5.0, 10.0, 20.0, 1.0], dtype=torch.float64)
    masks = soft_topk(scores, k, candidates, temperature=1e-3)
    hidden = torch.where(candidates, scores, torch.full_like(scores, -1e9))
    for row in range(4):
        top = set(hidden[row].topk(int(k[row])).indices.tolist())
        assert set(torch.nonzero(masks[row] > 0.5).flatten().tolist()) == top


def test_gradient_is_the_implicit_one():
    """d sum(m) / d z = 0 (the sum is held at k); d sum(m) / d k = 1; and d m_j / d k follows the
    finite difference of the masks themselves."""
    scores, k, candidates = _inputs(2)
    scores.requires_grad_(True)
    k = k.clone().requires_grad_(True)
    masks = soft_topk(scores, k, candidates, temperature=0.5)
    masks.sum().backward()
    assert torch.allclose(scores.grad, torch.zeros_like(scores), atol=1e-6)
    assert torch.allclose(k.grad[:3], torch.ones(3, dtype=torch.float64), atol=1e-6)

    weight = torch.linspace(0, 1, 60, dtype=torch.float64)
    k.grad = None
    (soft_topk(scores, k, candidates, 0.5) * weight).sum().backward()
    eps = 1e-4
    with torch.no_grad():
        up = (soft_topk(scores, k + eps, candidates, 0.5) * weight).sum(-1)
        down = (soft_topk(scores, k - eps, candidates, 0.5) * weight).sum(-1)
    assert torch.allclose(k.grad[:3], ((up - down) / (2 * eps))[:3], rtol=1e-3)
