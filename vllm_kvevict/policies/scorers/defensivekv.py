"""``defensivekv``: a defensive (worst-case) aggregation of window attention, times value norms.

1. Per window query row, avg-pool attention along tokens (``kernel``, the config's pooling
   kernel, 5) and rescale the row to its original mass (mass-preserving).
2. Max over the ``G`` query heads of the group and over the ``W`` window queries; floor each
   head's scores at that head's mean (no candidate is judged below average).
3. Multiply by ``nbar1`` (group mean of ``||v_j @ Wo[h]||_1``) normalised across KV heads per
   token (divided by its sum over heads).
4. Stage 1 (from CriticalKV): per head, rank candidates by mean attention (over window queries
   and the group), normalised over the candidates; the tokens BEFORE the one where the cumulative
   share reaches ``DEFENSIVE_MASS - window_mass`` (at most ``B - W``) are lifted above every
   other token of the layer (kept first, in stage-2 order). ``window_mass`` = mean attention the
   window queries pay to the window itself, which the window keeps anyway.
5. The allocator (``adakv``; ``global`` for layer-DefensiveKV) takes the top-k over the heads.

The window is protected. Follows FFY0/DefensiveKV ``EfficientDefensiveKVPress``, except
``window_mass``: the official code measures it on the last ``W`` candidates (its slice comes
after the window was dropped), which reads as a slip; we use the window's own mass.

The stage-1 lift stays a finite amount added to the values, not a ``preferred`` mask: the
``global`` allocation and page pooling normalise the lifted values as numbers (the official code
also marks stage 1 in-band, as the layer's maximum), so a mask would change their choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.base import LayerInputs, LayerScores, Needs, Scorer
from vllm_kvevict.policies.ops import (
    candidates_then_protected,
    group_mean,
    pool_tokens,
    value_l1_norm,
    window_attention,
)
from vllm_kvevict.policies.registry import register_scorer

#: Cumulative share of mean attention that stage 1 must cover.
DEFENSIVE_MASS = 0.9


def stage1_mask(mean_attention: torch.Tensor, mass: float, limit: int) -> torch.Tensor:
    """``[Hkv, N]`` bool: per head, the top tokens before the cumulative share reaches ``mass``.

    At most ``limit`` per head (the official ``argmax(cumsum >= mass)`` count).
    """
    ordered, order = torch.sort(mean_attention, dim=-1, descending=True, stable=True)
    cumulative = ordered.cumsum(-1) / ordered.sum(-1, keepdim=True).clamp_min(1e-30)
    count = (cumulative < mass).sum(-1, keepdim=True).clamp(max=max(0, limit))
    chosen = torch.arange(ordered.shape[-1]).expand_as(ordered) < count
    return torch.zeros_like(chosen).scatter(-1, order, chosen)


@dataclass(frozen=True)
class DefensiveKV(Scorer):
    """DefensiveKV over a window of ``window`` queries, pooled with ``kernel``; ``budget(L)`` is
    the tokens kept per head (``config.budget_tokens``), which bounds stage 1."""

    window: int
    kernel: int
    budget: Callable[[int], int] = field(repr=False)

    @property
    def needs(self) -> Needs:
        return Needs(window=self.window, o_proj=True)

    def score(self, inputs: LayerInputs) -> LayerScores:
        length, hkv, groups = inputs.seq_len, inputs.num_kv_heads, inputs.group_size
        window = min(self.window, length)
        candidates = length - window
        if candidates == 0:
            return candidates_then_protected(torch.zeros(hkv, 0), length)
        full = window_attention(inputs, window)  # [H, W, L]
        attn = full[..., :candidates]
        window_mass = float(full[..., candidates:].sum(-1).mean())
        pooled = pool_tokens(attn, self.kernel, "avg")
        pooled = pooled * (attn.sum(-1, keepdim=True) / pooled.sum(-1, keepdim=True).clamp_min(1e-30))
        worst = pooled.reshape(hkv, groups * attn.shape[1], candidates).amax(1)
        worst = torch.maximum(worst, worst.mean(-1, keepdim=True))
        nbar1 = value_l1_norm(inputs)[:, :candidates]
        scores = worst * nbar1 / nbar1.sum(0, keepdim=True).clamp_min(1e-30)
        limit = self.budget(length) - window
        first = stage1_mask(group_mean(attn.mean(1), hkv), DEFENSIVE_MASS - window_mass, limit)
        lift = scores.max() - scores.min() + 1.0
        scores = torch.where(first, scores + lift, scores)
        return candidates_then_protected(scores, length)


@register_scorer("defensivekv")
def defensivekv(config: EvictionConfig) -> DefensiveKV:
    return DefensiveKV(window=config.window, kernel=config.pooling_kernel, budget=config.budget_tokens)
