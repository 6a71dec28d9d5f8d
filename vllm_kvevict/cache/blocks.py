"""How many blocks a compacted request needs, from the budget alone, and where its tail starts.

Head-page layout (docs/HEAD_PAGES.md): a layer's page of block ``b`` is ``Hkv`` planes of
``block_size`` slots; head-page ``b * Hkv + p`` is plane ``p`` of block ``b`` in that layer.
Head ``g`` of layer ``l`` keeps ``B[l, g]`` tokens in ``ceil(B[l, g] / bs)`` head-pages, taken
from the planes of the request's ``K`` compact blocks (the same ``K`` block ids in every layer).

Bound. Let layer ``l`` keep ``T_l = sum_g B[l, g] <= Hkv * Bbar_l`` tokens with every head at
most ``M_l`` tokens. Since ``ceil(x / bs) <= (x + bs - 1) / bs`` and ``ceil(x / bs) <=
ceil(M_l / bs)``, the layer needs at most

    pages_l = min(floor((T_l + Hkv * (bs - 1)) / bs), Hkv * ceil(M_l / bs))

head-pages, which fit in ``ceil(pages_l / Hkv)`` blocks, whatever the imbalance across heads.
``K = max_l ceil(pages_l / Hkv)`` never exceeds DESIGN.md's ``ceil(max_l Bbar_l / bs) + 1``
(:func:`simple_compact_blocks_bound`) and is smaller when heads are equal (``uniform``,
``pyramid``: ``ceil(Bbar / bs)``), when ``Hkv == 1``, or when ``Bbar mod bs == 1``.

The scheduler computes ``K`` without any score: ``Bbar_l`` and ``M_l`` are known per
allocation (:func:`layer_budget_bounds`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies import global_layer_cap, pyramid_layer_budget
from vllm_kvevict.policies.head_page_select import pages_per_head


@dataclass(frozen=True)
class LayerBudgetBound:
    """What the scheduler knows about one layer's kept set before any score exists.

    Attributes
    ----------
    mean : upper bound of the layer's mean head budget ``Bbar_l`` (tokens per KV head).
    head_max : upper bound of any single head's budget ``B[l, g]``.
    """

    mean: int
    head_max: int


#: Allocations whose layer total is exactly ``Hkv * budget_tokens`` but whose heads may differ.
_LAYER_EXACT_UNEQUAL = ("adakv", "adakv_floor", "lkv")


def layer_budget_bounds(config: EvictionConfig, prompt_len: int, num_layers: int) -> list[LayerBudgetBound]:
    """Per layer, the bounds of :class:`LayerBudgetBound` for ``config`` and a prompt of ``prompt_len``.

    * budget that keeps everything: every head keeps the prompt (``P``, ``P``);
    * ``uniform``: (``B``, ``B``) with ``B = config.budget_tokens(P)``;
    * ``adakv``, ``adakv_floor``, ``lkv``: (``B``, ``P``): the layer sums to ``Hkv * B``, one head
      may keep anything up to the prompt;
    * ``pyramid``: (``b_l``, ``b_l``) with ``b_l = pyramid_layer_budget(l, ...)``;
    * ``global``: (``global_layer_cap(B, P)``, ``P``): the layer cap of the global allocator.

    Two-stage scorers (``criticalkv``) end with the head budgets of the allocation they use, so the
    same bounds hold. An allocation not listed raises ``ValueError``: its bound must be added here.
    """
    budget = config.budget_tokens(prompt_len)
    if config.keeps_everything or budget >= prompt_len:
        return [LayerBudgetBound(prompt_len, prompt_len)] * num_layers
    allocation = config.resolved_allocation
    if allocation == "uniform":
        return [LayerBudgetBound(budget, budget)] * num_layers
    if allocation in _LAYER_EXACT_UNEQUAL:
        return [LayerBudgetBound(budget, prompt_len)] * num_layers
    if allocation == "pyramid":
        per_layer = [pyramid_layer_budget(layer, num_layers, prompt_len, config) for layer in range(num_layers)]
        return [LayerBudgetBound(b, b) for b in per_layer]
    if allocation == "global":
        return [LayerBudgetBound(global_layer_cap(budget, prompt_len), prompt_len)] * num_layers
    raise ValueError(f"no compact-region bound for allocation {allocation!r}: add it to layer_budget_bounds")


def head_pages_bound(bound: LayerBudgetBound, block_size: int, num_kv_heads: int) -> int:
    """Most head-pages one layer can need: ``min(floor((T + h (bs-1)) / bs), Hkv ceil(M / bs))``.

    ``T = Hkv * mean`` and ``h = min(Hkv, T)`` heads at most can be non-empty.
    """
    total = num_kv_heads * bound.mean
    nonempty = min(num_kv_heads, total)
    by_total = (total + nonempty * (block_size - 1)) // block_size
    by_head = num_kv_heads * math.ceil(bound.head_max / block_size)
    return min(by_total, by_head)


def compact_blocks_needed(
    config: EvictionConfig, prompt_len: int, block_size: int, num_layers: int, num_kv_heads: int
) -> int:
    """``K``: compact blocks a request needs so every layer's head-pages fit, from the budget alone.

    ``K = max_l ceil(pages_l / Hkv)`` with ``pages_l`` from :func:`head_pages_bound`; always
    ``<= ceil(max_l Bbar_l / bs) + 1``. When each head keeps whole pages
    (``config.head_selection_for(bs) == "page"``) every head-page is one page of the prompt and
    ``K`` is :func:`~vllm_kvevict.policies.head_page_select.pages_per_head`, the ideal.
    ``num_kv_heads`` is the heads this worker holds (per tensor-parallel rank); ranks with equal
    head counts get the same ``K``.
    """
    _check_sizes(prompt_len, block_size, num_layers, num_kv_heads)
    bounds = layer_budget_bounds(config, prompt_len, num_layers)
    if config.head_selection_for(block_size) == "page" and bounds[0].mean < prompt_len:
        return pages_per_head(config, prompt_len, block_size)  # every head-page holds one whole run
    return max(_ceil_div(head_pages_bound(b, block_size, num_kv_heads), num_kv_heads) for b in bounds)


def simple_compact_blocks_bound(config: EvictionConfig, prompt_len: int, block_size: int, num_layers: int) -> int:
    """DESIGN.md's ``ceil(max_l Bbar_l / bs) + 1`` (an upper bound of :func:`compact_blocks_needed`)."""
    bounds = layer_budget_bounds(config, prompt_len, num_layers)
    return _ceil_div(max(b.mean for b in bounds), block_size) + 1


@dataclass(frozen=True)
class TailLayout:
    """Where the positional tail starts after a request's prompt is compacted.

    Position ``p`` lives in positional block ``p // bs``. Positions ``< tail_start`` are in the
    compact region. Positional blocks ``0 .. first_tail_block - 1`` hold only compacted
    positions and are released; block ``first_tail_block`` (if it exists yet) holds the prompt's
    last ``skipped_slots`` tokens, which attention skips, and is the first tail block; vLLM keeps
    allocating blocks ``first_tail_block + 1, ...`` by position as before.

    Attributes
    ----------
    prompt_len : tokens compacted (the eviction point).
    block_size : slots per block.
    tail_start : first position attention reads from the tail (``prompt_len``).
    first_tail_block : index in the request's positional block list (``prompt_len // bs``).
    skipped_slots : slots of the first tail block holding compacted prompt tokens
        (``prompt_len % bs``; 0 when the prompt ends on a block boundary, in which case the
        first tail block is allocated by vLLM with the next token).
    """

    prompt_len: int
    block_size: int
    tail_start: int
    first_tail_block: int
    skipped_slots: int

    @property
    def released_block_indices(self) -> range:
        """Indices in the positional block list released by compaction."""
        return range(self.first_tail_block)

    def released_block_ids(self, block_table: Sequence[int]) -> list[int]:
        """Block ids of ``block_table`` (the request's positional block list) that are released."""
        if len(block_table) < self.first_tail_block:
            raise ValueError(f"block table has {len(block_table)} blocks, prompt needs {self.first_tail_block}+")
        return [int(b) for b in block_table[: self.first_tail_block]]

    def tail_blocks(self, seq_len: int) -> int:
        """Positional blocks held for a sequence of ``seq_len`` tokens (prompt + generated)."""
        if seq_len < self.prompt_len:
            raise ValueError(f"seq_len={seq_len} is shorter than the compacted prompt ({self.prompt_len})")
        return _ceil_div(seq_len, self.block_size) - self.first_tail_block


def prompt_tail_layout(prompt_len: int, block_size: int) -> TailLayout:
    """:class:`TailLayout` for a request compacted after its first ``prompt_len`` tokens."""
    _check_sizes(prompt_len, block_size, 1, 1)
    return TailLayout(
        prompt_len=prompt_len,
        block_size=block_size,
        tail_start=prompt_len,
        first_tail_block=prompt_len // block_size,
        skipped_slots=prompt_len % block_size,
    )


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_sizes(prompt_len: int, block_size: int, num_layers: int, num_kv_heads: int) -> None:
    for name, value, low in (
        ("prompt_len", prompt_len, 0),
        ("block_size", block_size, 1),
        ("num_layers", num_layers, 1),
        ("num_kv_heads", num_kv_heads, 1),
    ):
        if int(value) != value or value < low:
            raise ValueError(f"{name}={value!r}: expected an integer >= {low}")
