"""``lkv`` (LKV-H): each layer's budget split across its KV heads by learned shares.

The shares ``s[l, g]`` (summing to 1 over a layer's heads) come from the model's trained
artifact for the request's budget; :class:`LKVShares` adds them to every layer's
:class:`~vllm_kvevict.policies.base.LayerScores` (``head_shares``), whatever the scorer, and the
allocator splits by them: each head first gets its protected and preferred count ``f[g]``, then
the rest of the layer's ``Hkv * B`` in proportion to ``s[g]``, no head above ``L`` (water-filling:
what a full head cannot take goes to the others by their shares), rounded by largest
remainders. Every layer sums to ``Hkv * B`` exactly, as ``adakv``: a request holds the blocks
of its largest layer, so at equal held blocks equal layer totals keep the most (docs/LKV.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.lkv.artifact import LKVSource
from vllm_kvevict.policies.allocators.adakv import largest_remainder
from vllm_kvevict.policies.base import LayerInputs, LayerScores, Needs, Scorer
from vllm_kvevict.policies.registry import register_allocator


def split_by_shares(shares: torch.Tensor, floor: torch.Tensor, total: int, cap: int) -> torch.Tensor:
    """``[Hkv]`` int64 budgets summing to ``total``: ``floor[g]`` plus the rest by ``shares``, each
    at most ``cap``.

    Parameters
    ----------
    shares : ``[Hkv]`` non-negative (renormalised over the heads still below ``cap``).
    floor : ``[Hkv]`` int64, ``sum(floor) <= total``, each ``<= cap``.
    total : ``<= Hkv * cap``.
    """
    if int(floor.sum()) > total or total > cap * floor.numel():
        raise ValueError(f"cannot split {total} over heads with floors {floor.tolist()} and cap {cap}")
    target = floor.to(torch.float64)
    weights = shares.to(torch.float64).clamp_min(0.0) + 1e-12
    room = target < cap
    for _ in range(floor.numel()):
        extra = total - float(target.sum())
        if extra <= 1e-9 or not room.any():
            break
        w = torch.where(room, weights, torch.zeros_like(weights))
        target = torch.minimum(target + extra * w / w.sum(), torch.full_like(target, float(cap)))
        room = target < cap - 1e-9
    return largest_remainder(target, total)


def layer_split(scores: LayerScores, budget: int) -> torch.Tensor:
    """``[Hkv]`` int64 budgets of one layer (``budget`` kept per head on average)."""
    if scores.head_shares is None:
        raise ValueError("allocation lkv splits by LayerScores.head_shares: build the policy with build_policy, "
                         "which adds LKV-H's shares")
    floor = scores.ranked_first.sum(-1).to(torch.int64)
    return split_by_shares(scores.head_shares, floor, scores.num_kv_heads * budget, scores.seq_len)


@register_allocator("lkv")
def lkv(scores: list[LayerScores], budget: int, config: EvictionConfig) -> torch.Tensor:
    return torch.stack([layer_split(s, int(budget)) for s in scores])


@dataclass(frozen=True)
class LKVShares(Scorer):
    """``inner``'s scores with LKV-H's head shares for the request's budget attached."""

    inner: Scorer
    source: LKVSource
    config: EvictionConfig

    @property
    def needs(self) -> Needs:
        return self.inner.needs

    def shares(self, inputs: LayerInputs) -> torch.Tensor:
        """``[Hkv]`` float32 shares of layer ``inputs.layer_idx`` at the budget's fraction of ``L``."""
        fraction = self.config.budget_tokens(inputs.seq_len) / max(inputs.seq_len, 1)
        return self.source.artifact().head_shares(fraction)[inputs.layer_idx].contiguous()

    def score(self, inputs: LayerInputs) -> LayerScores:
        return replace(self.inner.score(inputs), head_shares=self.shares(inputs))

    def page_score(self, inputs: LayerInputs) -> LayerScores:
        return replace(self.inner.page_score(inputs), head_shares=self.shares(inputs))
