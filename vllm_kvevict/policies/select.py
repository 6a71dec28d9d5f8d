"""From scores to kept token indices: allocation, then each head's first tokens in rank order.

Every allocator returns head budgets that cover each head's protected (and preferred) tokens,
and :func:`select_kept` keeps each head's first ``B[l, g]`` tokens in the order of
:func:`~vllm_kvevict.policies.ranking.rank`, so window and sinks are always kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.allocation import Allocation
from vllm_kvevict.policies.base import LayerScores
from vllm_kvevict.policies.ranking import rank


@dataclass
class KeptSet:
    """What a request keeps.

    Attributes
    ----------
    indices : per layer, per KV head: int64 token positions, sorted ascending, unique; head
        ``g`` of layer ``l`` holds ``head_budgets[l, g]`` of them.
    head_budgets : ``[num_layers, Hkv]`` int64.
    scores : per layer, the :class:`LayerScores` the selection ranked.
    key_only : VECTOR only (else ``None``): per layer, per KV head, the sorted positions kept
        as a key alone (disjoint from ``indices``, which are then the whole tokens); two cost
        one slot, so ``head_budgets`` counts ``len(indices) + len(key_only) / 2``.
    """

    indices: list[list[torch.Tensor]]
    head_budgets: torch.Tensor
    scores: list[LayerScores]
    key_only: Optional[list[list[torch.Tensor]]] = None

    @property
    def num_layers(self) -> int:
        return len(self.indices)

    def kept_tokens(self) -> int:
        """Kept (layer, head, token) slots in all (two key-only tokens are one)."""
        return int(self.head_budgets.sum())


def select_kept(scores: LayerScores, budgets: torch.Tensor) -> list[torch.Tensor]:
    """Each head's first ``budgets[g]`` positions in rank order, sorted ascending."""
    keep = rank(scores) < budgets[:, None]
    return [torch.nonzero(row).flatten() for row in keep]


def keep_all(scores: list[LayerScores], seq_len: int) -> KeptSet:
    """Every position of every head (a budget that keeps everything)."""
    everything = torch.arange(seq_len)
    num_kv_heads = scores[0].num_kv_heads if scores else 0
    return KeptSet(
        indices=[[everything.clone() for _ in range(s.num_kv_heads)] for s in scores],
        head_budgets=torch.full((len(scores), num_kv_heads), seq_len, dtype=torch.int64),
        scores=list(scores),
    )


def fixed_head_budgets(scores: list[LayerScores]) -> Optional[torch.Tensor]:
    """``[num_layers, Hkv]`` head budgets the scorer fixed in every layer, ``None`` if in none."""
    fixed = [s.head_budgets for s in scores]
    if all(b is None for b in fixed):
        return None
    if any(b is None for b in fixed):
        raise ValueError("head budgets fixed in some layers only")
    return torch.stack(fixed).to(torch.int64)


def planned_budgets(scores: list[LayerScores], config: EvictionConfig, seq_len: int) -> Optional[torch.Tensor]:
    """``[L, Hkv]`` head budgets for ``scores``: the ones a scorer fixed itself, else the
    allocator's split of ``config.budget_tokens(seq_len)``; ``None`` when the budget keeps
    everything (``budget == 1``, a token count ``>= L``, scorer ``none``)."""
    budget = config.budget_tokens(seq_len)
    if config.keeps_everything or budget >= seq_len:
        return None
    budgets = fixed_head_budgets(scores)
    return Allocation(config).split(scores, budget) if budgets is None else budgets


def plan_kept(scores: list[LayerScores], config: EvictionConfig, seq_len: int) -> KeptSet:
    """Allocation + selection of single tokens for every layer.

    Parameters
    ----------
    scores : per layer ``[Hkv, L]``, ``L = seq_len``, window and sinks protected
        (:meth:`vllm_kvevict.policies.Policy.score_layer`).
    config : the policy; the allocator is ``config.resolved_allocation``.
    seq_len : ``L``; the mean head budget is ``config.budget_tokens(seq_len)``.

    A budget that keeps everything (``budget == 1``, a token count ``>= L``, scorer ``none``)
    keeps every position. Head budgets a scorer fixed itself (``LayerScores.head_budgets``:
    CriticalKV with a per-layer allocation) replace the allocator's.
    """
    for s in scores:
        if s.seq_len != seq_len:
            raise ValueError(f"scores cover {s.seq_len} tokens, expected seq_len={seq_len}")
    budgets = planned_budgets(scores, config, seq_len)
    if budgets is None:
        return keep_all(scores, seq_len)
    indices = [select_kept(s, b) for s, b in zip(scores, budgets)]
    return KeptSet(indices=indices, head_budgets=budgets, scores=list(scores))
