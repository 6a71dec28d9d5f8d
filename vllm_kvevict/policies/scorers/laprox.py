"""``laprox``: attention spread times value-output norm, normalised per layer for global selection.

``p[h, j] = ||A[h, :, j]||_2 * ||v[g, j] @ Wo[h]||_2`` (L2 over the window queries; the value
term via the ``d x d`` Gram matrix of ``Wo[h]``), mean over the group, avg-pooled with kernel
:data:`LAPROX_POOL_KERNEL` (``LayerInputs.extras["laprox_pool_kernel"]`` overrides), then divided
by the layer's sum so every layer's candidates sum to 1. The window is ``+inf``. Default
allocation ``global``. From the abstract and a third-party reading of the paper: to validate.
"""

from __future__ import annotations

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.base import LayerInputs
from vllm_kvevict.policies.ops import fill_protected, group_mean, pool_tokens, value_l2_norm, window_attention
from vllm_kvevict.policies.registry import register_scorer

#: LaProx's pooling kernel along tokens.
LAPROX_POOL_KERNEL = 7


@register_scorer("laprox")
def laprox(inputs: LayerInputs, config: EvictionConfig) -> torch.Tensor:
    length = inputs.seq_len
    window = min(config.window, length)
    candidates = length - window
    attn = window_attention(inputs, window)[..., :candidates]  # [H, W, Lc]
    spread = torch.linalg.vector_norm(attn, dim=1)  # [H, Lc]
    scores = group_mean(spread * value_l2_norm(inputs)[:, :candidates], inputs.num_kv_heads)
    scores = pool_tokens(scores, int(inputs.extras.get("laprox_pool_kernel", LAPROX_POOL_KERNEL)), "avg")
    scores = scores / scores.sum().clamp_min(1e-30)
    return fill_protected(scores, length)
