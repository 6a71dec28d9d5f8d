"""``knorm``: tokens with small keys matter more (score ``-||k_j||_2``)."""

from __future__ import annotations

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.base import LayerInputs
from vllm_kvevict.policies.registry import register_scorer


@register_scorer("knorm")
def knorm(inputs: LayerInputs, config: EvictionConfig) -> torch.Tensor:
    return -torch.linalg.vector_norm(inputs.keys.float(), dim=-1)
