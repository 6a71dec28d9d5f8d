"""Head granularity with whole pages per head (``head_selection="page"``).

Each KV head of each layer keeps its own set of block-aligned ``block_size``-token runs of the
prompt (KV-Compress's per-head blocks), with the layer's pages split across heads by the plan's
allocator exactly as tokens are in ``head_selection="token"``. A run's score is the mean of its
tokens' scores (the scorer's page variant, as page granularity uses); a run holding a protected
(or preferred) position is required. Every head-page of the compaction then holds one whole run
(only the prompt's last run may be partial), so a layer needs exactly ``Hkv * P`` head-pages with
``P = max(ceil(B / block_size), required runs)`` and the request holds ``K = P`` blocks: the
ideal, where per-token selection needs up to one more block for partly filled head-pages.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.allocation import Allocation
from vllm_kvevict.policies.base import LayerScores
from vllm_kvevict.policies.protection import window_and_sinks
from vllm_kvevict.policies.ranking import rank_rows
from vllm_kvevict.policies.select import KeptSet, keep_all


def run_scores(scores: LayerScores, block_size: int) -> LayerScores:
    """``[Hkv, ceil(L / bs)]`` run scores: the mean of each run's other tokens, protected
    where the run holds a protected or preferred token (a required run); the head shares (if
    any) carried over."""
    mean, required = _runs(scores.values, scores.ranked_first, block_size)
    return LayerScores(values=mean, protected=required, head_shares=scores.head_shares)


def _runs(values: torch.Tensor, ranked_first: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, required)`` ``[..., ceil(L / bs)]`` of :func:`run_scores` from ``[..., L]`` values
    and ranked-first masks (one layer, or layers stacked: the same row-wise arithmetic)."""
    length = values.shape[-1]
    runs = math.ceil(length / block_size)
    pad = runs * block_size - length
    shape = (*values.shape[:-1], runs, block_size)
    values = F.pad(values.double(), (0, pad)).view(shape)
    required = F.pad(ranked_first, (0, pad), value=False).view(shape)
    counted = F.pad(~ranked_first, (0, pad), value=False).view(shape)
    mean = torch.where(counted, values, torch.zeros_like(values)).sum(-1) / counted.sum(-1).clamp_min(1)
    return mean.float(), required.any(-1)


def pages_per_head(config: EvictionConfig, seq_len: int, block_size: int) -> int:
    """``P``: runs each head keeps on average (the compact blocks a request needs)."""
    runs = math.ceil(seq_len / block_size)
    ends = F.pad(window_and_sinks(seq_len, config.window, config.resolved_sinks), (0, runs * block_size - seq_len))
    required = int(ends.view(runs, block_size).any(-1).sum())
    return min(runs, max(math.ceil(config.budget_tokens(seq_len) / block_size), required))


def plan_head_pages(scores: list[LayerScores], config: EvictionConfig, seq_len: int, block_size: int) -> KeptSet:
    """Kept runs per (layer, KV head), as token indices, from per-layer ``[Hkv, L]`` page scores."""
    if any(s.head_budgets is not None for s in scores):
        raise ValueError("whole pages per head split runs with the plan's allocator: give page scores")
    pages = pages_per_head(config, seq_len, block_size)
    if pages * block_size >= seq_len:  # also when the budget keeps everything: then pages = all runs
        return keep_all(scores, seq_len)
    if not scores:
        return KeptSet(indices=[], head_budgets=torch.zeros(0, dtype=torch.int64), scores=[])
    # every layer at once (row-wise ops, so each layer's numbers are what run_scores gives it)
    mean, required = _runs(torch.stack([s.values for s in scores]), torch.stack([s.ranked_first for s in scores]),
                           block_size)
    runs = [LayerScores(values=m, protected=r, head_shares=s.head_shares) for m, r, s in zip(mean, required, scores)]
    run_budgets = Allocation(config).split(runs, pages)
    # each head's first budget runs in rank order (select_kept), every layer at once: protected
    # runs first by position, then by value descending, ties to the lower run
    kept_runs = rank_rows(mean, required) < run_budgets[..., None]
    tokens = kept_runs.repeat_interleave(block_size, dim=-1)[..., :seq_len]  # [L, Hkv, seq_len]
    counts = tokens.sum(-1)
    positions = torch.split(torch.nonzero(tokens)[:, -1].contiguous(), counts.flatten().tolist())  # ascending
    num_kv_heads = counts.shape[1]
    indices = [list(positions[l * num_kv_heads : (l + 1) * num_kv_heads]) for l in range(len(scores))]
    return KeptSet(indices=indices, head_budgets=counts.to(torch.int64), scores=list(scores))
