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
from vllm_kvevict.policies.ranking import layer_order, layer_order_rows
from vllm_kvevict.policies.registry import register_allocator


def layer_winners(scores: LayerScores, total: int) -> torch.Tensor:
    """``[Hkv]`` int64: how many of the layer's first ``total`` entries (:func:`layer_order`)
    each head holds."""
    return _winners(layer_order(scores), total, scores.seq_len, scores.num_kv_heads)


def _winners(order: torch.Tensor, total: int, seq_len: int, num_kv_heads: int) -> torch.Tensor:
    """``[..., Hkv]`` int64 winners per head from ``[..., Hkv * L]`` layer orders (rows: layers)."""
    heads = order[..., :total] // seq_len
    return torch.zeros((*heads.shape[:-1], num_kv_heads), dtype=torch.int64).scatter_add_(-1, heads,
                                                                                        torch.ones_like(heads))


def largest_remainder(target: torch.Tensor, total) -> torch.Tensor:
    """Round non-negative ``target`` (``[n]`` float, or ``[..., n]`` rows) to int64 summing to
    ``total`` (per row): the ``missing`` largest remainders get one more, ties to the lower index."""
    base = torch.floor(target + 1e-9).to(torch.int64)
    missing = total - base.sum(-1, keepdim=True)
    remainder = target - base.to(target.dtype)
    order = torch.sort(remainder, dim=-1, descending=True, stable=True).indices
    return base.scatter_add_(-1, order, (torch.arange(target.shape[-1]) < missing).to(torch.int64))


def adakv_layer(scores: LayerScores, budget: int, alpha: float) -> torch.Tensor:
    """``[Hkv]`` int64 head budgets of one layer."""
    total = scores.num_kv_heads * budget
    winners = layer_winners(scores, total).to(torch.float64)
    target = (1.0 - alpha) * winners + alpha * budget
    return largest_remainder(target, total)


@register_allocator("adakv")
def adakv(scores: list[LayerScores], budget: int, config: EvictionConfig) -> torch.Tensor:
    budget = int(budget)
    preferred = {s.preferred is None for s in scores}
    if len({tuple(s.values.shape) for s in scores}) != 1 or len(preferred) != 1:
        return torch.stack([adakv_layer(s, budget, config.alpha) for s in scores])
    # every layer at once: adakv_layer's row-wise arithmetic on layers stacked
    order = layer_order_rows(torch.stack([s.values for s in scores]), torch.stack([s.protected for s in scores]),
                             None if preferred == {True} else torch.stack([s.preferred for s in scores]))
    total = scores[0].num_kv_heads * budget
    winners = _winners(order, total, scores[0].seq_len, scores[0].num_kv_heads).to(torch.float64)
    return largest_remainder((1.0 - config.alpha) * winners + config.alpha * budget, total)
