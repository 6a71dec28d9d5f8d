"""``tova``: the last query's attention, averaged over ALL query heads; same for every KV head.

The last position itself is ``+inf`` (kvpress ``TOVAPress``); with ``window = 1`` the kept set
matches kvpress exactly.
"""

from __future__ import annotations

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.base import LayerInputs
from vllm_kvevict.policies.ops import fill_protected, window_attention
from vllm_kvevict.policies.registry import register_scorer


@register_scorer("tova")
def tova(inputs: LayerInputs, config: EvictionConfig) -> torch.Tensor:
    attn = window_attention(inputs, 1)[..., : inputs.seq_len - 1]  # [H, 1, L-1]
    scores = attn.mean(0).expand(inputs.num_kv_heads, -1)
    return fill_protected(scores, inputs.seq_len)
