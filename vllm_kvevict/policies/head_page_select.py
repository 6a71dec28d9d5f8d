"""Head granularity with whole pages per head (``head_selection="page"``).

Each KV head of each layer keeps its own set of block-aligned ``block_size``-token runs of the
prompt (KV-Compress's per-head blocks), with the layer's pages split across heads by the plan's
allocator exactly as tokens are in ``head_selection="token"``. A run's score is the mean of its
tokens' scores (the scorer's page variant, as page granularity uses); a run holding a window or
sink position is required (``+inf``). Every head-page of the compaction then holds one whole run
(only the prompt's last run may be partial), so a layer needs exactly ``Hkv * P`` head-pages with
``P = max(ceil(B / block_size), required runs)`` and the request holds ``K = P`` blocks: the
ideal, where per-token selection needs up to one more block for partly filled head-pages.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.registry import ALLOCATORS
from vllm_kvevict.policies.select import KeptSet, keep_all, protect, select_kept


def run_scores(protected: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[Hkv, ceil(L / bs)]`` float32: mean score of each run, ``+inf`` where a run holds one."""
    num_kv_heads, length = protected.shape
    runs = math.ceil(length / block_size)
    x = F.pad(protected.double(), (0, runs * block_size - length), value=float("nan")).view(num_kv_heads, runs, -1)
    required = (x == float("inf")).any(-1)
    finite = torch.isfinite(x)
    mean = torch.where(finite, x, torch.zeros_like(x)).sum(-1) / finite.sum(-1).clamp_min(1)
    return torch.where(required, torch.full_like(mean, float("inf")), mean).float()


def pages_per_head(config: EvictionConfig, seq_len: int, block_size: int) -> int:
    """``P``: runs each head keeps on average (the compact blocks a request needs)."""
    runs = math.ceil(seq_len / block_size)
    required = torch.isinf(run_scores(protect(torch.zeros(1, seq_len), config), block_size)).sum()
    return min(runs, max(math.ceil(config.budget_tokens(seq_len) / block_size), int(required)))


def plan_head_pages(scores: list[torch.Tensor], config: EvictionConfig, seq_len: int, block_size: int) -> KeptSet:
    """Kept runs per (layer, KV head), as token indices; ``scores`` per layer ``[Hkv, L]``."""
    pages = pages_per_head(config, seq_len, block_size)
    if pages * block_size >= seq_len:  # also when the budget keeps everything: then pages = all runs
        return keep_all(scores, seq_len)
    protected = [protect(s, config) for s in scores]
    runs = [run_scores(p, block_size) for p in protected]
    run_budgets = ALLOCATORS[config.resolved_allocation](runs, pages, config)
    indices = []
    for r, b in zip(runs, run_budgets):
        row = []
        for kept_runs in select_kept(r, b):
            tokens = (kept_runs.view(-1, 1) * block_size + torch.arange(block_size)).flatten()
            row.append(tokens[tokens < seq_len])
        indices.append(row)
    head_budgets = torch.tensor([[len(t) for t in row] for row in indices], dtype=torch.int64)
    return KeptSet(indices=indices, head_budgets=head_budgets, scores=protected)
