"""Page granularity: whole blocks kept or evicted for every layer and head at once (vLLM plugin).

Block score (:func:`page_scores`): for each (layer, KV head) row of scores, the values of the
tokens neither protected nor preferred are shifted to be non-negative (only when some are
negative) and divided by their sum, so every row weighs the same whatever the scorer's scale;
protected and preferred tokens count as the row's largest normalised value. Rows are summed over
layers and heads, and a block's score is the mean over the tokens it holds (the last block may
be partial).

Block count (:func:`select_pages`): with ``B = config.budget_tokens(seq_len)`` and the *required*
blocks (those holding a sink, a window position, and the last block),
``n = min(num_blocks, max(ceil(B / block_size), len(required)))`` blocks are kept: all required
ones plus the best-scored others. Because ``B >= W + S``, ``len(required) <=
ceil((W + S - 1) / block_size) + 2``, so ``n <= ceil(B / block_size) + 2 <=
ceil(budget * prompt_blocks) + 2`` for a fractional budget whose floor (``min_tokens``) does not
bind, and ``ceil(min_tokens / block_size) + 2`` when it does.

Evicted blocks (:func:`evicted_blocks`, what the vLLM plugin frees): the blocks not kept, all
full blocks before the one holding the prompt's last token (always kept: decode appends to it).

Decode-time eviction (docs/DECODE_EVICTION.md) scores the *held* tokens (kept blocks in order,
then the tail: every block full but the last) and passes the budget of the request's whole
length: ``config.budget_tokens(seq_len)`` for ``seq_len`` tokens so far.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.base import LayerScores


def _normalised_rows(rows: torch.Tensor, ranked_first: torch.Tensor) -> torch.Tensor:
    """``[N, L]`` rows normalised as the module docstring says; ``ranked_first`` ``[N, L]`` bool."""
    rows = rows.double()
    counted = ~ranked_first
    safe = torch.where(counted, rows, torch.zeros_like(rows))
    low = torch.where(counted, rows, torch.full_like(rows, float("inf"))).amin(-1, keepdim=True)
    shift = torch.where(torch.isfinite(low) & (low < 0), low, torch.zeros_like(low))
    safe = torch.where(counted, safe - shift, torch.zeros_like(safe))
    total = safe.sum(-1, keepdim=True)
    count = counted.sum(-1, keepdim=True).clamp_min(1)
    norm = torch.where(total > 0, safe / total.clamp_min(1e-300), counted.double() / count)
    top = torch.where(counted, norm, torch.zeros_like(norm)).amax(-1, keepdim=True)
    top = torch.where(counted.any(-1, keepdim=True), top, torch.full_like(top, 1.0 / rows.shape[-1]))
    return torch.where(counted, norm, top.expand_as(norm))


def page_scores(scores: list[LayerScores], block_size: int) -> torch.Tensor:
    """Block scores ``[ceil(L / block_size)]`` float32 from per-layer ``[Hkv, L]`` token scores."""
    length = scores[0].seq_len
    rows = torch.cat([s.values for s in scores])
    ranked_first = torch.cat([s.ranked_first for s in scores])
    per_token = _normalised_rows(rows, ranked_first).sum(0)
    num_blocks = math.ceil(length / block_size)
    padded = torch.zeros(num_blocks * block_size, dtype=per_token.dtype)
    padded[:length] = per_token
    counts = torch.full((num_blocks,), float(block_size), dtype=per_token.dtype)
    counts[-1] = length - (num_blocks - 1) * block_size
    return (padded.view(num_blocks, block_size).sum(-1) / counts).float()


def required_blocks(seq_len: int, block_size: int, config: EvictionConfig) -> torch.Tensor:
    """``[num_blocks]`` bool: blocks holding a sink, a window position, or the last token."""
    num_blocks = math.ceil(seq_len / block_size)
    required = torch.zeros(num_blocks, dtype=torch.bool)
    sinks = min(config.resolved_sinks, seq_len)
    if sinks > 0:
        required[: math.ceil(sinks / block_size)] = True
    window = min(config.window, seq_len)
    required[(seq_len - max(window, 1)) // block_size :] = True
    return required


def select_pages(block_scores: torch.Tensor, seq_len: int, block_size: int, config: EvictionConfig,
                 budget: Optional[int] = None) -> torch.Tensor:
    """Sorted int64 indices of the blocks kept (count rule in the module docstring).

    ``budget``: tokens to keep, when not ``config.budget_tokens(seq_len)`` (decode-time eviction
    scores the held tokens but budgets the request's whole length)."""
    num_blocks = math.ceil(seq_len / block_size)
    if block_scores.shape[0] != num_blocks:
        raise ValueError(f"{block_scores.shape[0]} block scores for {num_blocks} blocks of {seq_len} tokens")
    budget = config.budget_tokens(seq_len) if budget is None else budget
    if config.keeps_everything or budget >= seq_len:
        return torch.arange(num_blocks)
    required = required_blocks(seq_len, block_size, config)
    keep = min(num_blocks, max(math.ceil(budget / block_size), int(required.sum())))
    ranked = torch.where(required, torch.full_like(block_scores.double(), float("inf")), block_scores.double())
    order = torch.sort(ranked, descending=True, stable=True).indices
    return torch.sort(order[:keep]).values


def evicted_blocks(scores: list[LayerScores], seq_len: int, block_size: int, config: EvictionConfig,
                   budget: Optional[int] = None) -> list[int]:
    """Sorted indices of the blocks to evict (of ``seq_len`` scored tokens), from per-layer page
    scores; ``budget`` as :func:`select_pages`."""
    keep = set(select_pages(page_scores(scores, block_size), seq_len, block_size, config, budget).tolist())
    last_block = (seq_len - 1) // block_size
    return [b for b in range(last_block) if b not in keep]
