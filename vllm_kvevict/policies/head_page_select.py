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
from vllm_kvevict.policies.select import KeptSet, keep_all, select_kept


def run_scores(scores: LayerScores, block_size: int) -> LayerScores:
    """``[Hkv, ceil(L / bs)]`` run scores: the mean of each run's other tokens, protected
    where the run holds a protected or preferred token (a required run); the head shares (if
    any) carried over."""
    num_kv_heads, length = scores.values.shape
    runs = math.ceil(length / block_size)
    pad = runs * block_size - length
    values = F.pad(scores.values.double(), (0, pad)).view(num_kv_heads, runs, -1)
    required = F.pad(scores.ranked_first, (0, pad), value=False).view(num_kv_heads, runs, -1)
    counted = F.pad(~scores.ranked_first, (0, pad), value=False).view(num_kv_heads, runs, -1)
    mean = torch.where(counted, values, torch.zeros_like(values)).sum(-1) / counted.sum(-1).clamp_min(1)
    return LayerScores(values=mean.float(), protected=required.any(-1), head_shares=scores.head_shares)


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
    runs = [run_scores(s, block_size) for s in scores]
    run_budgets = Allocation(config).split(runs, pages)
    indices = []
    for r, b in zip(runs, run_budgets):
        row = []
        for kept_runs in select_kept(r, b):
            tokens = (kept_runs.view(-1, 1) * block_size + torch.arange(block_size)).flatten()
            row.append(tokens[tokens < seq_len])
        indices.append(row)
    head_budgets = torch.tensor([[len(t) for t in row] for row in indices], dtype=torch.int64)
    return KeptSet(indices=indices, head_budgets=head_budgets, scores=list(scores))
