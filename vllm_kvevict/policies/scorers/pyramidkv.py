"""``pyramidkv``: the ``snapkv`` score; the layer budgets come from the ``pyramid`` allocator."""

from __future__ import annotations

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.registry import register_scorer
from vllm_kvevict.policies.scorers.snapkv import SnapKV, snapkv


@register_scorer("pyramidkv")
def pyramidkv(config: EvictionConfig) -> SnapKV:
    return snapkv(config)
