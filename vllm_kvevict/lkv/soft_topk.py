"""A differentiable top-k: soft keep-masks that sum to a (fractional, learnable) budget.

Per row, ``m_j = sigmoid((z_j - tau) / T)`` over the row's candidates, with ``z`` the scores
standardised over those candidates and ``tau`` the threshold where ``sum_j m_j = k``. ``tau``
is found by bisection without gradient; one Newton step taken with gradient then gives ``tau``
the implicit-function gradient (``d tau / d z_j = m_j (1 - m_j) / sum_i m_i (1 - m_i)``,
``d tau / d k = -T / sum_i m_i (1 - m_i)``), so the masks answer both to the scores and to the
budget. As ``T -> 0`` the masks become the hard top-k.
"""

from __future__ import annotations

import torch

#: Bisection steps for ``tau`` (the bracket shrinks by 2 ** -steps).
BISECTION_STEPS = 40


def standardise(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``[N, L]`` scores shifted and scaled to mean 0, std 1 over each row's candidates."""
    count = candidates.sum(-1, keepdim=True).clamp_min(1)
    zeros = torch.zeros_like(scores)
    mean = torch.where(candidates, scores, zeros).sum(-1, keepdim=True) / count
    var = torch.where(candidates, (scores - mean) ** 2, zeros).sum(-1, keepdim=True) / count
    return (scores - mean) / (var + 1e-6).sqrt()


def soft_topk(scores: torch.Tensor, k: torch.Tensor, candidates: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft keep-masks ``[N, L]`` in ``[0, 1]``, 0 off the candidates, each row summing to ``k``.

    Parameters
    ----------
    scores : ``[N, L]`` float32 (higher = keep).
    k : ``[N]`` float32 budgets, clamped to ``[0, candidates per row]``.
    candidates : ``[N, L]`` bool: the entries the budget is spent on.
    temperature : ``T > 0``, in units of the standardised scores.
    """
    z = standardise(scores, candidates)
    k = torch.minimum(k.clamp_min(0.0), candidates.sum(-1).to(k.dtype))
    neg = torch.finfo(z.dtype).min

    def masks(tau: torch.Tensor) -> torch.Tensor:
        m = torch.sigmoid((z - tau[:, None]) / temperature)
        return torch.where(candidates, m, torch.zeros_like(m))

    with torch.no_grad():
        zc = torch.where(candidates, z, torch.full_like(z, neg))
        hi = zc.amax(-1) + 30.0 * temperature
        lo = torch.where(candidates, z, torch.full_like(z, -neg)).amin(-1) - 30.0 * temperature
        for _ in range(BISECTION_STEPS):
            mid = (lo + hi) / 2
            above = masks(mid).sum(-1) > k
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        tau0 = (lo + hi) / 2
        slope = (masks(tau0) * (1 - masks(tau0))).sum(-1).clamp_min(1e-6) / temperature
    m0 = masks(tau0)
    tau = tau0 + (m0.sum(-1) - k) / slope  # value ~ tau0; gradient: the implicit one
    return masks(tau)
