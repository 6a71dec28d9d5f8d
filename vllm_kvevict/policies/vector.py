"""VECTOR (keep, approximate or evict): a wrapper around any scorer, and its per-head routes.

VECTOR (arXiv 2605.23258; public description only, no code) keeps a token whole, keeps only
its key (its value rebuilt at attention time as ``[k', 1] @ W[l, g]``, :mod:`vllm_kvevict.vector`),
or evicts it. In this project's terms (budget ``b`` = share of the prompt kept, ``p_c = 1 - b``):

* each head's budget ``B[g]`` (slots, from the allocation exactly as without VECTOR) is what
  it holds; a key-only token costs half a slot (two share one: the K and the V half);
* the head converts ``a[g] = floor(B[g] * p_a / b)`` whole slots into ``2 a[g]`` key-only
  tokens: its pool is its first ``B[g] + a[g]`` tokens in rank order (the relaxed pool
  ``1 - p_c + p_a``), the ``2 a[g]`` pooled tokens with the smallest residual
  residual keep their key only, the other ``B[g] - a[g]`` whole; memory
  ``B[g] - a[g] + 2 a[g] / 2 = B[g]``, plain eviction's; the residual is ``||v - v_hat||^2``
  (``vector_residual`` absolute) or ``||v - v_hat||^2 / ||v||^2`` (relative);
* a head whose calibration held-out R^2 is below ``vector_min_r2`` converts nothing
  (``a[g] = 0``: all ``B[g]`` slots whole);
* ``p_a`` (``vector_share``) defaults to ``min(p_c / 2, (1 - p_c) / 2)``;
* window and sink tokens (``protected``) are always kept whole: ``a[g]`` is capped so they fit
  (``B[g] - a[g] >= protected``), and so the pool fits in the prompt (``B[g] + a[g] <= L``).

Ties in the residual order go to the lower position. Selection is over single tokens per head
(``head_selection`` token); granularity is head.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.base import LayerInputs, LayerScores, Needs, Scorer
from vllm_kvevict.policies.ranking import rank
from vllm_kvevict.policies.select import KeptSet, keep_all, planned_budgets
from vllm_kvevict.vector.artifact import VectorArtifact, VectorSource

#: Floor of ``||v||^2`` under the relative residual (a zero value has an infinite relative error).
_TINY = 1e-12


@dataclass(frozen=True)
class VectorResiduals(Scorer):
    """``base``'s scores with every token's reconstruction residual attached
    (``LayerScores.residuals``), from ``source``'s artifact: ``||v - v_hat||^2``, divided by
    ``||v||^2`` when ``relative``."""

    base: Scorer
    source: VectorSource
    relative: bool = False

    @property
    def needs(self) -> Needs:
        return self.base.needs

    def score(self, inputs: LayerInputs) -> LayerScores:
        scores = self.base.score(inputs)
        artifact = self.source.artifact()
        positions = inputs.positions if inputs.positions is not None else torch.arange(inputs.seq_len)
        residuals = artifact.residuals(inputs.layer_idx, inputs.keys, inputs.values, positions)
        if self.relative:
            residuals = residuals / (inputs.values.float() ** 2).sum(dim=-1).clamp_min(_TINY)
        return replace(scores, residuals=torch.nan_to_num(residuals, nan=float("inf")).contiguous())


def converted_slots(budgets: torch.Tensor, ratio: float, protected: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[Hkv]`` int64 ``a[g]``: whole slots each head turns into two key-only tokens.

    ``budgets [Hkv]`` slots, ``ratio = p_a / b``, ``protected [Hkv]`` always-whole counts.
    """
    a = torch.floor(budgets.to(torch.float64) * ratio).to(torch.int64)
    a = torch.minimum(a, budgets - protected)
    a = torch.minimum(a, seq_len - budgets)
    return a.clamp_min(0)


def split_routes(scores: LayerScores, budgets: torch.Tensor, ratio: float,
                 convertible: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``[Hkv, L]`` bool masks ``(whole, key_only)`` of one layer (rules in the module docstring).

    ``scores.residuals`` must be set; ``budgets [Hkv]`` int64 slots per head; ``convertible
    [Hkv]`` bool (default all): heads that may hold key-only tokens.
    """
    if scores.residuals is None:
        raise ValueError("vector routes need residuals (VectorResiduals)")
    L = scores.seq_len
    protected = scores.protected
    a = converted_slots(budgets, ratio, protected.sum(dim=1), L)
    if convertible is not None:
        a = torch.where(convertible, a, torch.zeros_like(a))
    pool = rank(scores) < (budgets + a)[:, None]
    candidates = pool & ~protected
    key = torch.where(candidates, scores.residuals, torch.full_like(scores.residuals, float("inf")))
    order = torch.sort(key, dim=-1, stable=True).indices
    by_residual = torch.empty_like(order)
    by_residual.scatter_(-1, order, torch.arange(L).expand_as(order))
    key_only = candidates & (by_residual < (2 * a)[:, None])
    return pool & ~key_only, key_only


def convertible_heads(artifact: VectorArtifact, min_r2: float) -> torch.Tensor:
    """``[Nl, Hkv]`` bool: heads whose chosen key variant's held-out R^2 is at least ``min_r2``."""
    chosen = torch.where(artifact.derotate, artifact.r2[..., 1], artifact.r2[..., 0])
    return chosen >= min_r2


def plan_vector(scores: list[LayerScores], config: EvictionConfig, seq_len: int,
                convertible: Optional[torch.Tensor] = None) -> KeptSet:
    """Allocation as without VECTOR, then each head's routes: ``KeptSet.indices`` the whole
    tokens, ``KeptSet.key_only`` the key-only ones, ``head_budgets`` the slots held.
    ``convertible [Nl, Hkv]`` bool (default all; :func:`convertible_heads`): heads that may
    hold key-only tokens."""
    budgets = planned_budgets(scores, config, seq_len)
    if budgets is None:
        return keep_all(scores, seq_len)
    ratio = config.vector_share_for(seq_len) * seq_len / config.budget_tokens(seq_len)
    whole, key_only = [], []
    for layer, (layer_scores, layer_budgets) in enumerate(zip(scores, budgets)):
        gate = None if convertible is None else convertible[layer]
        w, k = split_routes(layer_scores, layer_budgets, ratio, gate)
        whole.append([torch.nonzero(row).flatten() for row in w])
        key_only.append([torch.nonzero(row).flatten() for row in k])
    return KeptSet(indices=whole, head_budgets=budgets, scores=list(scores), key_only=key_only)
