"""``global`` (LaProx, layer-DefensiveKV): one top-k over every layer and head, with a layer cap.

Each layer's scores are normalised (shifted by their minimum when negative, then divided by
their sum, over the entries of all heads neither protected nor preferred) so layers compare;
the model keeps its top ``num_layers * Hkv * B`` entries. Protected and preferred entries are
always kept: they sort above every normalised score (as ``+inf`` in this allocator's internal
key; ties between them go to the lower layer, head and position).

Layer cap: a layer keeps at most ``Hkv * global_layer_cap(B, L)`` tokens, i.e. its mean head
budget is at most ``min(L, GLOBAL_LAYER_CAP_FACTOR * B)``. The scheduler knows this number from
the budget alone, so it can size a request's compact region (``ceil(max_l Bbar_l / bs) + 1``
blocks, DESIGN.md) before any score exists. Capping is exact water-filling: each layer's
entries are first truncated to its top ``cap`` and the global top-k is taken over the rest, which
equals greedy selection in global order subject to the caps.
"""

from __future__ import annotations

import math

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.base import LayerScores
from vllm_kvevict.policies.registry import register_allocator

#: A layer's mean head budget under ``global`` is at most this many times the mean budget ``B``.
GLOBAL_LAYER_CAP_FACTOR = 2.0


def global_layer_cap(budget: int, seq_len: int) -> int:
    """Largest mean head budget (tokens per KV head) one layer may keep under ``global``."""
    return min(seq_len, int(math.floor(GLOBAL_LAYER_CAP_FACTOR * budget)))


def normalise_layer(scores: LayerScores) -> torch.Tensor:
    """``[Hkv, L]`` float64 key: the values of the tokens neither protected nor preferred, shifted
    to ``>= 0`` (if needed) and summing to 1; ``+inf`` for the others."""
    out = scores.values.double().clone()
    counted = ~scores.ranked_first
    if counted.any():
        values = out[counted]
        low = values.min()
        if low < 0:
            values = values - low
        total = values.sum()
        out[counted] = values / total if total > 0 else torch.full_like(values, 1.0 / values.numel())
    out[~counted] = float("inf")
    return out


@register_allocator("global")
def global_topk(scores: list[LayerScores], budget: int, config: EvictionConfig) -> torch.Tensor:
    num_layers = len(scores)
    num_kv_heads, seq_len = scores[0].values.shape
    cap = num_kv_heads * global_layer_cap(int(budget), seq_len)
    stacked = torch.stack([normalise_layer(s) for s in scores]).reshape(num_layers, -1)
    # Truncate each layer to its own top ``cap`` entries; the rest can never be chosen.
    order = torch.sort(stacked, dim=-1, descending=True, stable=True)
    eligible = torch.full_like(stacked, float("-inf"))
    eligible.scatter_(-1, order.indices[:, :cap], order.values[:, :cap])
    total = min(num_layers * num_kv_heads * int(budget), num_layers * cap)
    top = torch.sort(eligible.reshape(-1), descending=True, stable=True).indices[:total]  # ties: lower layer
    counts = torch.bincount(top // seq_len, minlength=num_layers * num_kv_heads)
    return counts.reshape(num_layers, num_kv_heads)
