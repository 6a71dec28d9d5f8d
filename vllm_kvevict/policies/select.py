"""From scores to kept token indices: protection, allocation, per-head top-k.

Convention: a score of ``+inf`` means "must keep". :func:`protect` sets the window (last
``config.window`` positions) and the sinks (first ``config.resolved_sinks``) to ``+inf``; every
allocator returns head budgets that cover those, and :func:`select_kept` keeps each head's top
``B[l, g]`` protected scores, so window and sinks are always kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.layer_budgets import rank_in_row
from vllm_kvevict.policies.registry import ALLOCATORS, preselects


@dataclass
class KeptSet:
    """What a request keeps.

    Attributes
    ----------
    indices : per layer, per KV head: int64 token positions, sorted ascending, unique; head
        ``g`` of layer ``l`` holds ``head_budgets[l, g]`` of them.
    head_budgets : ``[num_layers, Hkv]`` int64.
    scores : per layer ``[Hkv, L]``: the protected scores the selection ranked (``+inf`` =
        window, sinks, or a two-stage scorer's final choice).
    """

    indices: list[list[torch.Tensor]]
    head_budgets: torch.Tensor
    scores: list[torch.Tensor]

    @property
    def num_layers(self) -> int:
        return len(self.indices)

    def kept_tokens(self) -> int:
        """Kept (layer, head, token) entries in all."""
        return int(self.head_budgets.sum())


def protect(scores: torch.Tensor, config: EvictionConfig) -> torch.Tensor:
    """``[Hkv, L]`` float32 copy with window and sinks set to ``+inf``."""
    out = scores.float().clone()
    length = out.shape[-1]
    sinks = min(config.resolved_sinks, length)
    window = min(config.window, length)
    out[:, :sinks] = float("inf")
    if window > 0:
        out[:, length - window :] = float("inf")
    return out


def select_kept(scores: torch.Tensor, budgets: torch.Tensor) -> list[torch.Tensor]:
    """Each head's top ``budgets[g]`` positions of ``scores`` ``[Hkv, L]``, sorted ascending.

    Ties are broken toward the lower position (stable descending sort).
    """
    keep = rank_in_row(scores) < budgets[:, None]
    return [torch.nonzero(row).flatten() for row in keep]


def keep_all(scores: list[torch.Tensor], seq_len: int) -> KeptSet:
    everything = torch.arange(seq_len)
    num_kv_heads = scores[0].shape[0] if scores else 0
    return KeptSet(
        indices=[[everything.clone() for _ in range(s.shape[0])] for s in scores],
        head_budgets=torch.full((len(scores), num_kv_heads), seq_len, dtype=torch.int64),
        scores=[s.float() for s in scores],
    )


def plan_kept(scores: list[torch.Tensor], config: EvictionConfig, seq_len: int) -> KeptSet:
    """Allocation + selection for every layer.

    Parameters
    ----------
    scores : per layer ``[Hkv, L]`` from :func:`vllm_kvevict.policies.score_layer`, ``L = seq_len``.
    config : the policy; the allocator is ``config.resolved_allocation``.
    seq_len : ``L``; the mean head budget is ``config.budget_tokens(seq_len)``.

    A budget that keeps everything (``budget == 1``, a token count ``>= L``, scorer ``none``)
    keeps every position. A two-stage scorer that made its final choice itself (``criticalkv``
    with a per-layer allocation) marks it with ``+inf``; its head budgets are those counts.
    """
    for s in scores:
        if s.shape[-1] != seq_len:
            raise ValueError(f"scores cover {s.shape[-1]} tokens, expected seq_len={seq_len}")
    budget = config.budget_tokens(seq_len)
    if config.keeps_everything or budget >= seq_len:
        return keep_all(scores, seq_len)
    protected = [protect(s, config) for s in scores]
    if preselects(config):
        budgets = torch.stack([(p == float("inf")).sum(-1) for p in protected]).to(torch.int64)
    else:
        budgets = ALLOCATORS[config.resolved_allocation](protected, budget, config)
    indices = [select_kept(p, b) for p, b in zip(protected, budgets)]
    return KeptSet(indices=indices, head_budgets=budgets, scores=protected)
