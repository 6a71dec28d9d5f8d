"""``adakv_floor`` (kvpress ``AdaKVPress``): a safeguard per head, then one top-k over the layer.

For each layer: every head first keeps its top ``n_safe = int(B * alpha)`` tokens (at least 1
when ``alpha > 0``); then the layer keeps its top ``Hkv * B`` scores with those safe tokens
forced in. ``B[g]`` counts the winners of head ``g``. Matches kvpress 0.5.5 exactly (its
window tokens, scored ``max + 1``, are our protected ones).
"""

from __future__ import annotations

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.allocators.adakv import layer_winners
from vllm_kvevict.policies.base import LayerScores
from vllm_kvevict.policies.ranking import rank
from vllm_kvevict.policies.registry import register_allocator


def safe_count(budget: int, alpha: float) -> int:
    """kvpress's ``n_safe``: ``int(B * alpha)``, at least 1 when ``alpha > 0`` and ``B > 0``."""
    n_safe = int(budget * alpha)
    if alpha > 0:
        n_safe = max(1, n_safe) if budget > 0 else 0
    return n_safe


def with_safeguard(scores: LayerScores, budget: int, alpha: float) -> LayerScores:
    """``scores`` with each head's first ``n_safe`` tokens (:func:`rank`) protected too."""
    return scores.protect(rank(scores) < safe_count(budget, alpha))


def adakv_floor_layer(scores: LayerScores, budget: int, alpha: float) -> torch.Tensor:
    """``[Hkv]`` int64 head budgets of one layer."""
    return layer_winners(with_safeguard(scores, budget, alpha), scores.num_kv_heads * budget)


@register_allocator("adakv_floor")
def adakv_floor(scores: list[LayerScores], budget: int, config: EvictionConfig) -> torch.Tensor:
    return torch.stack([adakv_floor_layer(s, int(budget), config.alpha) for s in scores])
