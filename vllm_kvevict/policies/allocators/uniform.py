"""``uniform``: every KV head of every layer keeps ``B`` tokens."""

from __future__ import annotations

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.base import LayerScores
from vllm_kvevict.policies.registry import register_allocator


@register_allocator("uniform")
def uniform(scores: list[LayerScores], budget: int, config: EvictionConfig) -> torch.Tensor:
    num_kv_heads = scores[0].num_kv_heads
    return torch.full((len(scores), num_kv_heads), int(budget), dtype=torch.int64)
