"""``criticalkv``: a two-stage wrapper around a base scorer (``snapkv`` by default).

Stage 1 keeps each head's top ``n1`` by the base score ``a``; stage 2 ranks the rest by
``(a + eps) * nbar1`` (``nbar1`` = group mean of ``||v_j @ Wo[h]||_1``, ``eps = 1e-4``) and fills
the head budget. Which ``n1``, following kvpress 0.5.5:

* ``uniform``: ``int(budget * L * rho)`` for a fractional budget (``int(B * rho)`` for a token
  budget), at least 1 — kvpress ``CriticalKVPress``;
* ``adakv_floor``: ``int(B[g] * rho)`` with ``B[g]`` the ``adakv_floor`` budgets of the base
  scores, and the Ada-KV safeguard tokens kept too — kvpress ``CriticalAdaKVPress``;
* ``adakv`` (our rounding) and ``pyramid``: ``int(B[g] * rho)`` on that allocator's budgets.

With these per-layer allocations the head budgets come from the BASE score (as in kvpress), so
the scorer makes the final choice itself and marks every kept token ``+inf`` (the plan then
takes the budgets from those marks). With ``global`` it only lifts the stage-1 winners
(``n1 = int(rho * B)`` per head) to ``+inf`` and returns stage-2 scores for the rest.
Base scorer: ``LayerInputs.extras["criticalkv_base"]`` or :data:`CRITICALKV_BASE`.

``eps`` is ``config.epsilon``, 0 by default: the paper's criterion ``a * nbar1``. The authors' code
and kvpress add an absolute ``1e-4`` (:data:`KVPRESS_EPSILON`, "for numerical stability"; the
kvpress parity test sets it). Where the pooled attention ``a`` of the stage-2 candidates is far
below it (heads that concentrate their attention: SmolLM2 at 2-3k tokens has ``a ~ 1e-9 .. 1e-5``
there), ``(a + eps) * nbar1 ~ eps * nbar1`` and stage 2 ranks by value norm alone, dropping needle
digits: docs/NEEDLE_STUDY.md (0.35 against 1.00 with eps 0, n=20).

Page granularity (:func:`criticalkv_page`) ranks blocks by the stage-2 criterion
``(a + eps) * nbar1`` of every token, with no ``+inf`` marks: the two stages split a per-head
budget, which whole pages shared by all heads do not have, and marking a quarter of each row
``+inf`` would leave page scores counting marks instead of weighing scores.
"""

from __future__ import annotations

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.base import LayerInputs
from vllm_kvevict.policies.layer_budgets import PER_LAYER_ALLOCATIONS, layer_head_budgets, rank_in_row
from vllm_kvevict.policies.ops import value_l1_norm
from vllm_kvevict.policies.registry import SCORERS, register_page_scorer, register_scorer
from vllm_kvevict.policies.select import protect

#: Base scorer of CriticalKV (ALGORITHMS.md and kvpress's usual pairing).
CRITICALKV_BASE = "snapkv"
#: The authors' code's and kvpress's epsilon in ``(a + eps) * nbar1`` (ours: ``config.epsilon``).
KVPRESS_EPSILON = 1e-4


def _stage1_uniform(length: int, config: EvictionConfig) -> int:
    if config.keeps_everything:
        count = int(length * config.rho)
    elif config.is_token_budget:
        count = int(int(config.budget) * config.rho)
    else:
        count = int(float(config.budget) * length * config.rho)
    return max(1, count) if config.rho > 0 else 0


def _stage1_counts(budgets: torch.Tensor, length: int, config: EvictionConfig) -> torch.Tensor:
    allocation = config.resolved_allocation
    if allocation == "uniform" or allocation == "global":
        return torch.full_like(budgets, _stage1_uniform(length, config))
    counts = (budgets * config.rho).to(torch.int64)
    if allocation == "adakv_floor":
        from vllm_kvevict.policies.allocators.adakv_floor import safe_count

        counts = counts.clamp_min(safe_count(config.budget_tokens(length), config.alpha))
    return counts


def _preselects(config: EvictionConfig) -> bool:
    return config.resolved_allocation in PER_LAYER_ALLOCATIONS


@register_scorer("criticalkv", preselects=_preselects)
def criticalkv(inputs: LayerInputs, config: EvictionConfig) -> torch.Tensor:
    base_name = inputs.extras.get("criticalkv_base", CRITICALKV_BASE)
    base = protect(SCORERS[base_name](inputs, config), config)
    forced = base == float("inf")
    if _preselects(config):
        budgets = layer_head_budgets(base, inputs, config)
    else:
        budgets = torch.full((inputs.num_kv_heads,), config.budget_tokens(inputs.seq_len), dtype=torch.int64)
    stage1 = forced | (rank_in_row(base) < _stage1_counts(budgets, inputs.seq_len, config)[:, None])
    stage2 = (base + config.epsilon) * value_l1_norm(inputs)
    stage2 = torch.where(stage1, torch.full_like(stage2, float("inf")), stage2)
    if _preselects(config):
        chosen = rank_in_row(stage2) < budgets[:, None]
        stage2 = torch.where(chosen, torch.full_like(stage2, float("inf")), stage2)
    return stage2


@register_page_scorer("criticalkv")
def criticalkv_page(inputs: LayerInputs, config: EvictionConfig) -> torch.Tensor:
    """``[Hkv, L]``: ``(a + eps) * nbar1`` (window and sinks ``+inf``), for page granularity."""
    base_name = inputs.extras.get("criticalkv_base", CRITICALKV_BASE)
    base = protect(SCORERS[base_name](inputs, config), config)
    return (base + config.epsilon) * value_l1_norm(inputs)
