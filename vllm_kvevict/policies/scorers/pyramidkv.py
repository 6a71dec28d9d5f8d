"""``pyramidkv``: the ``snapkv`` score; the layer budgets come from the ``pyramid`` allocator."""

from __future__ import annotations

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.base import LayerInputs
from vllm_kvevict.policies.registry import register_scorer
from vllm_kvevict.policies.scorers.snapkv import snapkv


@register_scorer("pyramidkv")
def pyramidkv(inputs: LayerInputs, config: EvictionConfig) -> torch.Tensor:
    return snapkv(inputs, config)
