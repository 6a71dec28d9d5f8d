"""``keydiff``: keep keys that differ from the mean direction (score ``-cos(k_j, anchor)``).

``anchor`` = mean of the L2-normalised keys of the head. Default: kvpress's one-shot
``KeyDiffPress`` (all ``L`` keys at once). The KeyDiff paper's block-wise iterative variant
(kvpress ``BlockPress(KeyDiffPress(), block_size=128)``) runs when ``block_size`` is set:
starting from the first ``B`` tokens, each block of new tokens joins the kept set, which is cut
back to its ``B`` best by the keydiff score among the kept and new keys. Its final kept set is
``preferred``, so ``uniform`` keeps exactly that set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.base import LayerInputs, LayerScores, Scorer
from vllm_kvevict.policies.registry import register_scorer


def keydiff_scores(keys: torch.Tensor) -> torch.Tensor:
    """``[Hkv, N, d]`` -> ``[Hkv, N]``: ``-cos(k_j, mean of unit keys)``."""
    keys = keys.float().unsqueeze(0)
    anchor = F.normalize(keys, p=2, dim=-1).mean(dim=2, keepdim=True)
    return -F.cosine_similarity(keys, anchor, dim=-1)[0]


def blockwise_kept(keys: torch.Tensor, budget: int, block_size: int) -> torch.Tensor:
    """``[Hkv, B]`` positions kept by the iterative block procedure (kvpress ``BlockPress``)."""
    num_kv_heads, length, dim = keys.shape
    kept = torch.arange(budget).expand(num_kv_heads, -1)
    for start in range(budget, length, block_size):
        new = torch.arange(start, min(start + block_size, length)).expand(num_kv_heads, -1)
        current = torch.cat([kept, new], dim=-1)
        scores = keydiff_scores(keys.gather(1, current.unsqueeze(-1).expand(-1, -1, dim)))
        kept = current.gather(-1, scores.topk(budget, dim=-1).indices)
    return kept


@dataclass(frozen=True)
class KeyDiff(Scorer):
    """KeyDiff, one-shot (``block_size=None``, kvpress ``KeyDiffPress``) or block-wise.

    ``budget(L)`` is the tokens kept per head for a prompt of ``L`` (the block-wise variant's
    ``B``; ``config.budget_tokens``).
    """

    block_size: Optional[int] = None
    budget: Optional[Callable[[int], int]] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.block_size is not None and self.budget is None:
            raise ValueError("block-wise KeyDiff needs the budget")

    def score(self, inputs: LayerInputs) -> LayerScores:
        scores = LayerScores.unprotected(keydiff_scores(inputs.keys))
        if self.block_size is None:
            return scores
        budget = self.budget(inputs.seq_len)
        if budget >= inputs.seq_len:
            return scores
        kept = blockwise_kept(inputs.keys.float(), budget, self.block_size)
        preferred = torch.zeros_like(scores.protected).scatter_(-1, kept, True)
        return LayerScores(values=scores.values, protected=scores.protected, preferred=preferred)


@register_scorer("keydiff")
def keydiff(config: EvictionConfig) -> KeyDiff:
    return KeyDiff(budget=config.budget_tokens)
