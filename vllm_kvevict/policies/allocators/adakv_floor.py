"""``adakv_floor`` (kvpress ``AdaKVPress``): a safeguard per head, then one top-k over the layer.

For each layer: every head first keeps its top ``n_safe = int(B * alpha)`` tokens (at least 1
when ``alpha > 0``); then the layer keeps its top ``Hkv * B`` scores with those safe tokens
forced in. ``B[g]`` counts the winners of head ``g``. Matches kvpress 0.5.5 exactly (its
window tokens, scored ``max + 1``, are our ``+inf``).
"""

from __future__ import annotations

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.allocators.adakv import layer_winners
from vllm_kvevict.policies.registry import register_allocator


def safe_count(budget: int, alpha: float) -> int:
    """kvpress's ``n_safe``: ``int(B * alpha)``, at least 1 when ``alpha > 0`` and ``B > 0``."""
    n_safe = int(budget * alpha)
    if alpha > 0:
        n_safe = max(1, n_safe) if budget > 0 else 0
    return n_safe


def with_safeguard(scores: torch.Tensor, budget: int, alpha: float) -> torch.Tensor:
    """``[Hkv, L]`` copy with each head's top ``n_safe`` raised to ``+inf``."""
    n_safe = safe_count(budget, alpha)
    guarded = scores.clone()
    if n_safe > 0:
        top = torch.topk(scores, n_safe, dim=-1).indices
        guarded.scatter_(-1, top, float("inf"))
    return guarded


def adakv_floor_layer(scores: torch.Tensor, budget: int, alpha: float) -> torch.Tensor:
    guarded = with_safeguard(scores, budget, alpha)
    return layer_winners(guarded, scores.shape[0] * budget)


@register_allocator("adakv_floor")
def adakv_floor(scores: list[torch.Tensor], budget: int, config: EvictionConfig) -> torch.Tensor:
    return torch.stack([adakv_floor_layer(s, int(budget), config.alpha) for s in scores])
