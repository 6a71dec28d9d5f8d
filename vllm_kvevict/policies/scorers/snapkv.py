"""``snapkv``: attention of the observation window, pooled along tokens, averaged per group.

``s[g, j] = mean_{h in g} pool_j( mean_t A[h, t, j] )`` over candidates ``j < L - W``; the window
is ``+inf``. Pooling: ``config.pooling`` / ``config.pooling_kernel`` (avg 5 = kvpress;
the SnapKV repo uses max 7). Same operation order as kvpress 0.5.5 ``SnapKVPress.score``.
"""

from __future__ import annotations

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.base import LayerInputs
from vllm_kvevict.policies.ops import fill_protected, pool_tokens, window_attention
from vllm_kvevict.policies.registry import register_scorer


def snapkv_candidates(inputs: LayerInputs, config: EvictionConfig) -> torch.Tensor:
    """``[Hkv, L - W]`` SnapKV scores of the positions before the window."""
    window = min(config.window, inputs.seq_len)
    attn = window_attention(inputs, window)[..., : inputs.seq_len - window]
    scores = pool_tokens(attn.mean(dim=-2), config.pooling_kernel, config.pooling)
    return scores.view(inputs.num_kv_heads, inputs.group_size, -1).mean(1)


@register_scorer("snapkv")
def snapkv(inputs: LayerInputs, config: EvictionConfig) -> torch.Tensor:
    return fill_protected(snapkv_candidates(inputs, config), inputs.seq_len)
