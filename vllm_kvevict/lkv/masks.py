"""Keep-masks of one prefilled example: soft ones to train through, hard ones as served.

Soft (training): LKV-T scores every (layer, KV head, token); LKV-H gives each head its share of
the layer's budget; :func:`~vllm_kvevict.lkv.soft_topk.soft_topk` turns both into masks that
sum to each head's budget. The window is always kept (mask 1), as every policy keeps it. With a
``block_size`` the soft top-k runs over whole pages (a page's score is its tokens' mean, as the
served whole-pages-per-head selection ranks them; pages holding the window are kept).

Hard (validation): the same scores and shares through the served plan
(:func:`~vllm_kvevict.policies.select.plan_kept` or whole pages per head,
:func:`~vllm_kvevict.policies.head_page_select.plan_head_pages`): masks of 0 and 1.

Shapes: ``Nl`` layers, ``nb`` budgets, ``Hkv`` KV heads, ``L`` cached tokens.
"""

from __future__ import annotations

from typing import Optional

import math

import torch
import torch.nn.functional as F

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.lkv.nets import HeadShares, TokenScorer
from vllm_kvevict.lkv.soft_topk import soft_topk
from vllm_kvevict.policies.base import LayerScores
from vllm_kvevict.policies.head_page_select import plan_head_pages
from vllm_kvevict.policies.protection import window_and_sinks
from vllm_kvevict.policies.select import KeptSet, plan_kept


def train_config(budget: float, window: int) -> EvictionConfig:
    """The policy a training budget stands for (scorer and allocation ``lkv``); the floor off, so
    a sampled fraction of the 768-1024-token examples is that fraction (as the packaged artifact
    was trained)."""
    return EvictionConfig(scorer="lkv", budget=budget, window=window, min_tokens=0)


def example_features(scorer: TokenScorer, keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    """``[Nl, Hkv, L, F]`` LKV-T features of every layer (no gradient: they are inputs)."""
    positions = torch.arange(keys[0].shape[1])
    with torch.no_grad():
        return torch.stack([scorer.features(k, v, positions) for k, v in zip(keys, values)])


def _pages(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[N, L]`` -> ``[N, ceil(L / bs), bs]`` (zero padded)."""
    runs = math.ceil(x.shape[-1] / block_size)
    return F.pad(x, (0, runs * block_size - x.shape[-1])).view(x.shape[0], runs, block_size)


def soft_masks(scorer: TokenScorer, shares: HeadShares, features: torch.Tensor, budgets: list[float], window: int,
               temperature: float, block_size: Optional[int] = None) -> list[torch.Tensor]:
    """Per layer ``[nb, Hkv, L]`` soft keep-masks for ``budgets`` (fractions of ``L``): of single
    tokens, or of whole ``block_size`` pages."""
    num_layers, num_kv_heads, length, _ = features.shape
    scores = scorer.hidden(features, slice(None)).reshape(num_layers * num_kv_heads, length)
    protected = window_and_sinks(length, window, 0)
    unit = 1 if block_size is None else block_size
    if block_size is not None:  # pages: mean score of the tokens, required where the window is
        counts = _pages(torch.ones(1, length), block_size).sum(-1)
        scores = _pages(scores, block_size).sum(-1) / counts
        protected = _pages(protected[None].float(), block_size).amax(-1)[0] > 0
    candidates = (~protected).expand(scores.shape)
    per_budget = []
    for budget in budgets:
        tokens = train_config(budget, window).budget_tokens(length)
        free = num_kv_heads * max(tokens / unit - int(protected.sum()), 0.0)
        k = (shares(tokens / length) * free).reshape(-1)
        masks = torch.where(protected, torch.ones_like(scores), soft_topk(scores, k, candidates, temperature))
        if block_size is not None:
            masks = masks[:, :, None].expand(-1, -1, block_size).reshape(masks.shape[0], -1)[:, :length]
        per_budget.append(masks.reshape(num_layers, num_kv_heads, length))
    stacked = torch.stack(per_budget, dim=1)  # [Nl, nb, Hkv, L]
    return list(stacked.unbind(0))


@torch.no_grad()
def served_kept(scorer: TokenScorer, shares: HeadShares, features: torch.Tensor, config: EvictionConfig,
                block_size: Optional[int] = None) -> KeptSet:
    """What the served ``lkv`` policy keeps for ``config``: single tokens per head
    (``block_size=None``), or whole ``block_size`` pages per head."""
    num_layers, _, length, _ = features.shape
    head_shares = shares(config.budget_tokens(length) / length)
    protected = window_and_sinks(length, config.window, config.resolved_sinks)
    values = scorer.hidden(features, slice(None))
    layers = [
        LayerScores(values=values[l].float().contiguous(), protected=protected.expand_as(values[l]).clone(),
                    head_shares=head_shares[l].contiguous())
        for l in range(num_layers)
    ]
    if block_size is None:
        return plan_kept(layers, config, length)
    return plan_head_pages(layers, config, length, block_size)


def kept_masks(kept: KeptSet, length: int) -> list[torch.Tensor]:
    """Per layer ``[1, Hkv, L]`` masks of 0 and 1 from a kept set."""
    masks = []
    for row in kept.indices:
        mask = torch.zeros(1, len(row), length)
        for head, idx in enumerate(row):
            mask[0, head, idx] = 1.0
        masks.append(mask)
    return masks
