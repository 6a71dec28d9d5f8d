"""``keydiff``: keep keys that differ from the mean direction (score ``-cos(k_j, anchor)``).

``anchor`` = mean of the L2-normalised keys of the head. Default: kvpress's one-shot
``KeyDiffPress`` (all ``L`` keys at once). The KeyDiff paper's block-wise iterative variant
(kvpress ``BlockPress(KeyDiffPress(), block_size=128)``) runs when
``LayerInputs.extras["keydiff_block_size"]`` (or :data:`KEYDIFF_BLOCK_SIZE`) is set: starting
from the first ``B`` tokens, each block of new tokens joins the kept set, which is cut back to
its ``B`` best by the keydiff score among the kept and new keys. Its final kept set is lifted
above every other token, so ``uniform`` keeps exactly that set.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.base import LayerInputs
from vllm_kvevict.policies.registry import register_scorer

#: Block size of the iterative variant; ``None`` = one-shot (kvpress ``KeyDiffPress``).
KEYDIFF_BLOCK_SIZE: Optional[int] = None


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


@register_scorer("keydiff")
def keydiff(inputs: LayerInputs, config: EvictionConfig) -> torch.Tensor:
    scores = keydiff_scores(inputs.keys)
    block_size = inputs.extras.get("keydiff_block_size", KEYDIFF_BLOCK_SIZE)
    budget = config.budget_tokens(inputs.seq_len)
    if block_size is None or budget >= inputs.seq_len:
        return scores
    kept = blockwise_kept(inputs.keys.float(), budget, int(block_size))
    lift = scores.max() - scores.min() + 1.0
    return scores.scatter_add(-1, kept, torch.full(kept.shape, float(lift)))
