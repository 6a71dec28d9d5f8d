"""``h2o``: heavy hitters by accumulated attention, plus the recent half of the budget.

``s[g, j]`` = mean over the group of ``attention_sum[h, j]`` (every query's attention so far);
when ``LayerInputs.attention_sum`` is missing, the window queries' attention summed stands in.
The last ``max(W, B // 2)`` positions are ``+inf`` (the recent half), so the heavy hitters fill
the other half of ``B = config.budget_tokens(L)``.
"""

from __future__ import annotations

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.base import LayerInputs
from vllm_kvevict.policies.ops import group_mean, window_attention
from vllm_kvevict.policies.registry import register_scorer


@register_scorer("h2o")
def h2o(inputs: LayerInputs, config: EvictionConfig) -> torch.Tensor:
    length = inputs.seq_len
    if inputs.attention_sum is not None:
        accumulated = inputs.attention_sum.float()
    else:
        accumulated = window_attention(inputs, min(config.window, length)).sum(1)
    scores = group_mean(accumulated, inputs.num_kv_heads).clone()
    recent = min(length, max(config.window, config.budget_tokens(length) // 2))
    scores[:, length - recent :] = float("inf")
    return scores
