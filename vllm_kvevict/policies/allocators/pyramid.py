"""``pyramid`` (PyramidKV): layer budgets shrink linearly with depth; heads of a layer share it.

Layer 0 keeps about ``2B - B/beta`` tokens per head and the last layer ``B/beta`` (``beta = 20``),
so the mean over layers stays ``B``. Formula, caps and fallback follow kvpress 0.5.5's
``PyramidKVPress.get_layer_budget`` (itself from KVCache-Factory) exactly, with ``B`` the
*unrounded* target ``config.budget_target(L)`` (``L * budget`` raised to ``min_tokens``) for
fractional budgets:

* ``max = 2B - B/beta`` capped at ``L - W`` (then ``min = 2B - max``);
* if not ``L >= max >= min >= W`` (short prompts), every layer gets ``round(B)``;
* else layer ``l`` gets ``round(max - l * (max - min) / (num_layers - 1))``.

Within a layer every head gets the layer budget (uniform, as kvpress), clamped to
``[min(L, W + S), L]``.
"""

from __future__ import annotations

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.base import LayerScores
from vllm_kvevict.policies.registry import register_allocator

#: PyramidKV's steepness (KVCache-Factory and kvpress default).
PYRAMID_BETA = 20


def pyramid_layer_budget(layer_idx: int, num_layers: int, seq_len: int, config: EvictionConfig) -> int:
    """Tokens per KV head kept by layer ``layer_idx`` (kvpress ``get_layer_budget``, then clamped)."""
    window, target = config.window, config.budget_target(seq_len)
    max_capacity = window + target
    min_num = (max_capacity - window) / PYRAMID_BETA
    max_num = (max_capacity - window) * 2 - min_num
    if max_num >= seq_len - window:
        max_num = seq_len - window
        min_num = (max_capacity - window) * 2 - max_num
    if not (seq_len >= max_num >= min_num >= window):
        raw = max(1, round(target))
    else:
        steps = (max_num - min_num) / (num_layers - 1) if num_layers > 1 else 0.0
        raw = round(max_num - layer_idx * steps)
    floor = min(seq_len, window + config.resolved_sinks)
    return max(floor, min(int(raw), seq_len))


@register_allocator("pyramid")
def pyramid(scores: list[LayerScores], budget: int, config: EvictionConfig) -> torch.Tensor:
    num_layers = len(scores)
    num_kv_heads, seq_len = scores[0].values.shape
    per_layer = [pyramid_layer_budget(layer, num_layers, seq_len, config) for layer in range(num_layers)]
    return torch.tensor(per_layer, dtype=torch.int64)[:, None].expand(num_layers, num_kv_heads).clone()
