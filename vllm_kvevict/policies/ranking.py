"""The order tokens are kept in: per head (:func:`rank`) and over a whole layer (:func:`layer_order`).

Protected tokens come first (by position), then preferred ones, then the rest, both by value
descending; ties go to the lower position (and, over a layer, to the lower head). Two stable
sorts make that order exactly, with no sentinel value standing for a tier.
"""

from __future__ import annotations

from typing import Optional

import torch

from vllm_kvevict.policies.base import LayerScores


def _order(tier: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Indices along the last dim sorting by ``tier`` descending, then ``values`` descending,
    then index ascending."""
    by_value = torch.sort(values, dim=-1, descending=True, stable=True).indices
    by_tier = torch.sort(tier.gather(-1, by_value), dim=-1, descending=True, stable=True).indices
    return by_value.gather(-1, by_tier)


def _tier_and_values(values: torch.Tensor, protected: torch.Tensor,
                     preferred: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[..., L]`` int8 tier (2 protected, 1 preferred, 0 other) and the values sorted within
    tiers (0 where protected: protected tokens keep their position order)."""
    tier = protected.to(torch.int8) * 2
    if preferred is not None:
        tier = tier + (preferred & ~protected).to(torch.int8)
    return tier, torch.where(protected, torch.zeros_like(values), values)


def rank_rows(values: torch.Tensor, protected: torch.Tensor, preferred: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`rank` of every row of ``[..., L]`` values and masks (e.g. layers stacked, ``[layers, Hkv, L]``)."""
    order = _order(*_tier_and_values(values, protected, preferred))
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order))
    return ranks


def rank(scores: LayerScores) -> torch.Tensor:
    """``[Hkv, L]`` int64: 0 for each head's first choice, ``L - 1`` for its last."""
    return rank_rows(scores.values, scores.protected, scores.preferred)


def layer_order_rows(values: torch.Tensor, protected: torch.Tensor,
                     preferred: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`layer_order` of ``[..., Hkv, L]`` values and masks (e.g. layers stacked): ``[..., Hkv * L]``."""
    tier, ordered = _tier_and_values(values, protected, preferred)
    return _order(tier.flatten(-2), ordered.flatten(-2))


def layer_order(scores: LayerScores) -> torch.Tensor:
    """``[Hkv * L]`` int64: the layer's flattened entries ``g * L + j``, first choice first."""
    return layer_order_rows(scores.values, scores.protected, scores.preferred)
