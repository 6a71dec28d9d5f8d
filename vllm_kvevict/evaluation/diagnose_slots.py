"""The selector's decision slots, and the single swaps that vary one of them at a time.

A *unit* is where one decision is made: a (layer, KV head) at head granularity (its slots are
tokens, or block-aligned runs with whole pages per head), or the whole cache at page
granularity (its slots are blocks, shared by every layer and head). A *swap* takes one kept,
unprotected slot out and puts one evicted slot in, so the contract (the count of slots each unit
holds, the protected window and sinks) is unchanged.

Sampling: ``m`` kept slots the selector ranked lowest times ``m`` evicted slots it ranked
highest (the decision boundary, where a wrong order costs), in ``units`` units drawn with a
seeded ``random.Random``. ``m * m * units`` swaps; each costs one reference forward.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

#: Slot kinds: single tokens of one head, whole runs of one head, whole blocks of every head.
SLOT_KINDS = ("token", "head_page", "page")

KeptIndices = list[list[torch.Tensor]]


@dataclass(frozen=True)
class Unit:
    """One place a decision is made.

    Attributes
    ----------
    layer, head : the (layer, KV head); ``None`` for page granularity (every layer and head).
    rank : ``[S]`` int64, the selector's rank of each slot (0 = its first choice).
    protected : ``[S]`` bool, slots the contract always keeps (window, sinks, required blocks).
    kept : ``[S]`` bool, slots the selector kept.
    slot_size : tokens per slot (1 for tokens; the block size for runs and blocks).
    """

    layer: Optional[int]
    head: Optional[int]
    rank: torch.Tensor
    protected: torch.Tensor
    kept: torch.Tensor
    slot_size: int

    def tokens(self, slot: int, prompt_len: int) -> torch.Tensor:
        start = slot * self.slot_size
        return torch.arange(start, min(start + self.slot_size, prompt_len))


@dataclass(frozen=True)
class Swap:
    """Unit ``unit`` gives up slot ``out_slot`` (kept) for slot ``in_slot`` (evicted)."""

    unit: int
    out_slot: int
    in_slot: int


def slot_kept(kept_tokens: torch.Tensor, slot_size: int, prompt_len: int) -> torch.Tensor:
    """``[S]`` bool: slots whose every token is in ``kept_tokens`` (sorted int64 positions)."""
    num_slots = -(-prompt_len // slot_size)
    held = torch.zeros(num_slots * slot_size, dtype=torch.bool)
    held[kept_tokens] = True
    held[prompt_len:] = True  # a partial last slot is judged on its real tokens
    return held.view(num_slots, slot_size).all(-1)


def boundary_swaps(unit: Unit, m: int) -> list[tuple[int, int]]:
    """``(out_slot, in_slot)`` pairs: the ``m`` lowest-ranked kept unprotected slots times the
    ``m`` highest-ranked evicted slots."""
    order = torch.argsort(unit.rank)  # first choice first
    kept_order = [int(s) for s in order if unit.kept[s] and not unit.protected[s]]
    evicted_order = [int(s) for s in order if not unit.kept[s]]
    outs = kept_order[::-1][:m]
    ins = evicted_order[:m]
    return [(o, i) for o in outs for i in ins]


def sample_swaps(units: Sequence[Unit], m: int, num_units: int, seed: int) -> list[Swap]:
    """Boundary swaps of ``num_units`` units drawn with ``random.Random(seed)`` (all of them when
    there are no more), in unit order."""
    if m < 1 or num_units < 1:
        raise ValueError(f"m and units must be >= 1, got m={m}, units={num_units}")
    eligible = [i for i, u in enumerate(units) if bool((~u.kept).any()) and bool((u.kept & ~u.protected).any())]
    chosen = sorted(random.Random(seed).sample(eligible, min(num_units, len(eligible))))
    return [Swap(i, o, s) for i in chosen for o, s in boundary_swaps(units[i], m)]


def _replace(kept: torch.Tensor, out: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    keep = kept[~torch.isin(kept, out)]
    return torch.unique(torch.cat([keep, add]))  # sorted


def apply_swap(kept: KeptIndices, units: Sequence[Unit], swap: Swap, prompt_len: int) -> KeptIndices:
    """A new ``kept[layer][head]`` with ``swap`` applied (``kept`` is not modified)."""
    unit = units[swap.unit]
    out, add = unit.tokens(swap.out_slot, prompt_len), unit.tokens(swap.in_slot, prompt_len)
    new = [list(row) for row in kept]
    heads = [(unit.layer, unit.head)] if unit.layer is not None else [
        (l, h) for l in range(len(kept)) for h in range(len(kept[l]))
    ]
    for l, h in heads:
        new[l][h] = _replace(kept[l][h], out, add)
    return new


def repair_head(kept: torch.Tensor, missing: torch.Tensor, token_rank: torch.Tensor, locked: torch.Tensor) -> torch.Tensor:
    """Put ``missing`` tokens into one head at a fixed count: as many of its kept tokens go, the
    lowest-ranked ones not ``locked`` (``[L]`` bool: protected or evidence).

    Returns the head's new sorted kept positions (fewer tokens added if too few can go).
    """
    missing = missing[~torch.isin(missing, kept)]
    candidates = kept[~locked[kept]]
    n = min(int(missing.numel()), int(candidates.numel()))
    if n == 0:
        return kept
    worst = candidates[torch.argsort(token_rank[candidates], descending=True)[:n]]
    return _replace(kept, worst, missing[:n])
