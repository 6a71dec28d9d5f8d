"""The order tokens are kept in: per head (:func:`rank`) and over a whole layer (:func:`layer_order`).

Protected tokens come first (by position), then preferred ones, then the rest, both by value
descending; ties go to the lower position (and, over a layer, to the lower head). Two stable
sorts make that order exactly, with no sentinel value standing for a tier.
"""

from __future__ import annotations

import torch

from vllm_kvevict.policies.base import LayerScores


def _order(tier: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Indices along the last dim sorting by ``tier`` descending, then ``values`` descending,
    then index ascending."""
    by_value = torch.sort(values, dim=-1, descending=True, stable=True).indices
    by_tier = torch.sort(tier.gather(-1, by_value), dim=-1, descending=True, stable=True).indices
    return by_value.gather(-1, by_tier)


def _tier_and_values(scores: LayerScores) -> tuple[torch.Tensor, torch.Tensor]:
    """``[Hkv, L]`` int8 tier (2 protected, 1 preferred, 0 other) and the values sorted within
    tiers (0 where protected: protected tokens keep their position order)."""
    tier = scores.protected.to(torch.int8) * 2
    if scores.preferred is not None:
        tier = tier + (scores.preferred & ~scores.protected).to(torch.int8)
    values = torch.where(scores.protected, torch.zeros_like(scores.values), scores.values)
    return tier, values


def rank(scores: LayerScores) -> torch.Tensor:
    """``[Hkv, L]`` int64: 0 for each head's first choice, ``L - 1`` for its last."""
    order = _order(*_tier_and_values(scores))
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order))
    return ranks


def layer_order(scores: LayerScores) -> torch.Tensor:
    """``[Hkv * L]`` int64: the layer's flattened entries ``g * L + j``, first choice first.

    (:func:`rank` and :func:`layer_order` read only ``values``, ``protected`` and ``preferred``,
    row-wise: given them stacked over layers, ``[layers, Hkv, L]``, they give each layer's.)"""
    tier, values = _tier_and_values(scores)
    return _order(tier.flatten(-2), values.flatten(-2))
