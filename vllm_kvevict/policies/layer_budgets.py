"""Head budgets of ONE layer, for two-stage scorers that finish their layer's choice themselves."""

from __future__ import annotations

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.base import LayerInputs
from vllm_kvevict.policies.registry import ALLOCATORS

#: Allocations that split a layer's budget using that layer's scores only.
PER_LAYER_ALLOCATIONS = ("uniform", "adakv", "adakv_floor", "pyramid")


def layer_head_budgets(protected: torch.Tensor, inputs: LayerInputs, config: EvictionConfig) -> torch.Tensor:
    """``[Hkv]`` int64 budgets the plan's allocator would give this layer (per-layer allocations).

    ``protected`` is ``[Hkv, L]`` with window and sinks at ``+inf``.
    """
    allocation = config.resolved_allocation
    if allocation not in PER_LAYER_ALLOCATIONS:
        raise ValueError(f"allocation {allocation!r} does not split one layer on its own")
    length = inputs.seq_len
    if allocation == "pyramid":
        from vllm_kvevict.policies.allocators.pyramid import pyramid_layer_budget

        budget = pyramid_layer_budget(inputs.layer_idx, inputs.num_layers, length, config)
        return torch.full((inputs.num_kv_heads,), budget, dtype=torch.int64)
    return ALLOCATORS[allocation]([protected], config.budget_tokens(length), config)[0]


def rank_in_row(scores: torch.Tensor) -> torch.Tensor:
    """``[Hkv, L]`` int64: 0 for each head's best score (ties: lower position first)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(scores.shape[-1]).expand_as(order))
    return rank
