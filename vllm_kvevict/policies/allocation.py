"""The plan's allocation (``config.resolved_allocation``): over every layer, or over one.

:class:`Allocation` is what the plan splits the budget with, and what a scorer that fixes its
layer's head budgets itself (CriticalKV, as kvpress's ``CriticalAdaKVPress`` wraps Ada-KV)
composes: :meth:`Allocation.split_layer` gives the budgets the plan's allocator would give that
one layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.allocators.pyramid import pyramid_layer_budget
from vllm_kvevict.policies.base import LayerInputs, LayerScores
from vllm_kvevict.policies.registry import ALLOCATORS

#: Allocations that split a layer's budget using that layer's scores only.
PER_LAYER_ALLOCATIONS = ("uniform", "adakv", "adakv_floor", "pyramid")


@dataclass(frozen=True)
class Allocation:
    """The allocator ``config.resolved_allocation``, with the parameters it reads from ``config``
    (``alpha``, the budget's rounding, the pyramid schedule)."""

    config: EvictionConfig

    @property
    def name(self) -> str:
        return self.config.resolved_allocation

    @property
    def per_layer(self) -> bool:
        """Whether one layer's budgets depend on that layer's scores only."""
        return self.name in PER_LAYER_ALLOCATIONS

    def split(self, scores: list[LayerScores], budget: int) -> torch.Tensor:
        """``[num_layers, Hkv]`` int64 head budgets, ``budget`` kept per head on average."""
        return ALLOCATORS[self.name](scores, budget, self.config)

    def split_layer(self, scores: LayerScores, inputs: LayerInputs) -> torch.Tensor:
        """``[Hkv]`` int64: the budgets the plan gives layer ``inputs.layer_idx`` (per-layer only)."""
        if not self.per_layer:
            raise ValueError(f"allocation {self.name!r} does not split one layer on its own")
        length = inputs.seq_len
        if self.name == "pyramid":
            budget = pyramid_layer_budget(inputs.layer_idx, inputs.num_layers, length, self.config)
            return torch.full((inputs.num_kv_heads,), budget, dtype=torch.int64)
        return self.split([scores], self.config.budget_tokens(length))[0]
