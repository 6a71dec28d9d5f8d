"""``adakv`` (Ada-KV, our rounding): head budgets follow the layer-wide top-k, with largest remainders.

For each layer: take the top ``Hkv * B`` scores of the whole layer; ``f[g]`` = winners of head
``g``; ``B[g] = (1 - alpha) * f[g] + alpha * B``, rounded by largest remainders (ties: lower
head first) so that ``sum_g B[g] = Hkv * B`` exactly. Protected and preferred tokens are always
among the winners, so ``B[g]`` never drops below them. kvpress's rule is ``adakv_floor``.
"""

from __future__ import annotations

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.base import LayerScores
from vllm_kvevict.policies.ranking import layer_order
from vllm_kvevict.policies.registry import register_allocator


def layer_winners(scores: LayerScores, total: int) -> torch.Tensor:
    """``[Hkv]`` int64: how many of the layer's first ``total`` entries (:func:`layer_order`)
    each head holds."""
    top = layer_order(scores)[:total]
    return torch.bincount(top // scores.seq_len, minlength=scores.num_kv_heads)


def largest_remainder(target: torch.Tensor, total: int) -> torch.Tensor:
    """Round non-negative ``target`` (``[n]`` float) to int64 summing to ``total``."""
    base = torch.floor(target + 1e-9).to(torch.int64)
    missing = int(total - base.sum())
    if missing > 0:
        remainder = target - base.to(target.dtype)
        order = torch.sort(remainder, descending=True, stable=True).indices
        base[order[:missing]] += 1
    return base


def adakv_layer(scores: LayerScores, budget: int, alpha: float) -> torch.Tensor:
    """``[Hkv]`` int64 head budgets of one layer."""
    total = scores.num_kv_heads * budget
    winners = layer_winners(scores, total).to(torch.float64)
    target = (1.0 - alpha) * winners + alpha * budget
    return largest_remainder(target, total)


@register_allocator("adakv")
def adakv(scores: list[LayerScores], budget: int, config: EvictionConfig) -> torch.Tensor:
    return torch.stack([adakv_layer(s, int(budget), config.alpha) for s in scores])
