"""``criticalkv``: a two-stage wrapper around a base scorer (``snapkv`` by default).

Stage 1 keeps each head's top ``n1`` by the base score ``a``; stage 2 ranks the rest by
``(a + eps) * nbar1`` (``nbar1`` = group mean of ``||v_j @ Wo[h]||_1``) and fills the head
budget. Which ``n1``, following kvpress 0.5.5:

* ``uniform``: ``int(budget * L * rho)`` for a fractional budget (``int(B * rho)`` for a token
  budget), at least 1 — kvpress ``CriticalKVPress``; ``budget * L`` is
  ``config.budget_target(L)``, raised to ``min_tokens`` (kvpress has no floor);
* ``adakv_floor``: ``int(B[g] * rho)`` with ``B[g]`` the ``adakv_floor`` budgets of the base
  scores, and the Ada-KV safeguard tokens kept too — kvpress ``CriticalAdaKVPress``;
* ``adakv`` (our rounding) and ``pyramid``: ``int(B[g] * rho)`` on that allocator's budgets.

With these per-layer allocations the head budgets come from the BASE score (as in kvpress): the
scorer fixes them itself (``LayerScores.head_budgets``) and the plan keeps, per head, stage 1
(``preferred``) and then the best stage-2 scores up to them. With ``global`` stage 1 is
``n1 = int(rho * B)`` per head and the global allocator splits the budget.

``eps`` is ``epsilon``, 0 by default: the paper's criterion ``a * nbar1``. The authors' code and
kvpress add an absolute ``1e-4`` ("for numerical stability"; the kvpress parity test sets it).
Where the pooled attention ``a`` of the stage-2 candidates is far below it (heads that
concentrate their attention: SmolLM2 at 2-3k tokens has ``a ~ 1e-9 .. 1e-5`` there),
``(a + eps) * nbar1 ~ eps * nbar1`` and stage 2 ranks by value norm alone, dropping needle
digits: docs/NEEDLE_STUDY.md (0.35 against 1.00 with eps 0, n=20).

Page scores (:meth:`CriticalKV.page_score`) are the stage-2 criterion ``(a + eps) * nbar1`` of
every token, with no stage 1: the two stages split a per-head budget, which whole pages shared
by all heads do not have, and counting a quarter of each row as chosen would leave page scores
counting choices instead of weighing scores.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.allocation import Allocation
from vllm_kvevict.policies.allocators.adakv_floor import safe_count
from vllm_kvevict.policies.base import LayerInputs, LayerScores, Needs, Scorer
from vllm_kvevict.policies.ops import value_l1_norm
from vllm_kvevict.policies.ranking import rank
from vllm_kvevict.policies.registry import build_scorer, register_scorer


@dataclass(frozen=True)
class CriticalKV(Scorer):
    """CriticalKV around ``base`` (window and sinks already protected), under ``allocation``.

    ``rho`` is stage 1's share of a head's budget, ``epsilon`` stage 2's ``eps``.
    """

    base: Scorer
    allocation: Allocation
    rho: float = 0.5
    epsilon: float = 0.0

    @property
    def needs(self) -> Needs:
        return replace(self.base.needs, o_proj=True)

    def score(self, inputs: LayerInputs) -> LayerScores:
        base = self.base.score(inputs)
        fixes_budgets = self.allocation.per_layer
        if fixes_budgets:
            budgets = self.allocation.split_layer(base, inputs)
        else:
            budget = self.allocation.config.budget_tokens(inputs.seq_len)
            budgets = torch.full((inputs.num_kv_heads,), budget, dtype=torch.int64)
        stage1 = rank(base) < self.stage1_counts(budgets, inputs.seq_len)[:, None]
        return LayerScores(
            values=self.stage2(base, inputs),
            protected=base.protected,
            preferred=stage1 & ~base.protected,
            head_budgets=budgets if fixes_budgets else None,
        )

    def page_score(self, inputs: LayerInputs) -> LayerScores:
        base = self.base.score(inputs)
        return LayerScores(values=self.stage2(base, inputs), protected=base.protected)

    def stage2(self, base: LayerScores, inputs: LayerInputs) -> torch.Tensor:
        """``[Hkv, L]`` float32: ``(a + eps) * nbar1``."""
        return (base.values + self.epsilon) * value_l1_norm(inputs)

    def stage1_counts(self, budgets: torch.Tensor, seq_len: int) -> torch.Tensor:
        """``[Hkv]`` int64 ``n1`` per head from the head budgets (rules in the module docstring)."""
        config = self.allocation.config
        if self.allocation.name in ("uniform", "global"):
            count = int(config.budget_target(seq_len) * self.rho)
            return torch.full_like(budgets, max(1, count) if self.rho > 0 else 0)
        counts = (budgets * self.rho).to(torch.int64)
        if self.allocation.name == "adakv_floor":
            counts = counts.clamp_min(safe_count(config.budget_tokens(seq_len), config.alpha))
        return counts


@register_scorer("criticalkv")
def criticalkv(config: EvictionConfig) -> CriticalKV:
    return CriticalKV(
        base=build_scorer(config, config.criticalkv_base),
        allocation=Allocation(config),
        rho=config.rho,
        epsilon=config.epsilon,
    )
