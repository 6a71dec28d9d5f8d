"""``streamingllm``: keep the sinks and the most recent tokens (score = position)."""

from __future__ import annotations

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.base import LayerInputs
from vllm_kvevict.policies.registry import register_scorer


@register_scorer("streamingllm")
def streamingllm(inputs: LayerInputs, config: EvictionConfig) -> torch.Tensor:
    """Recency ``j``; the sinks (``config.resolved_sinks``, 4 by default) are kept by the plan."""
    recency = torch.arange(inputs.seq_len, dtype=torch.float32)
    return recency.expand(inputs.num_kv_heads, -1).clone()
