"""Which head-pages each (layer, KV head) gets, and where each kept token goes.

Given a :class:`~vllm_kvevict.policies.KeptSet` and the ``K`` compact block ids of a request,
head ``g`` of layer ``l`` needs ``n[l, g] = ceil(B[l, g] / bs)`` head-pages. In each layer it
first takes its own plane ``g`` of the compact blocks, in block order (``min(n, K)`` of them);
a head that needs more than ``K`` borrows the planes other heads leave free (blocks
``j >= n[l, p]`` of plane ``p``), in block-then-plane order, heads served in order. Kept token
``i`` of the head (``i``-th smallest position) goes to slot ``i % bs`` of its ``i // bs``-th page.

With VECTOR's key-only tokens (``kept.key_only``) a head's segment is its ``W`` whole tokens,
then its ``2a`` key-only tokens two to a slot: key-only token ``j`` goes to the head's slot
``W + j // 2``, its key in the K half when ``j`` is even and in the V half when it is odd
(:class:`KeyOnlyGather`). The head uses ``W + a`` slots, its budget ``B = head_budgets[l, g]``,
so it needs ``ceil(B / bs)`` head-pages as without VECTOR (the page where the whole tokens end
may hold key-only pairs in its last slots): ``K`` is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from vllm_kvevict.policies import KeptSet


class CompactRegionOverflow(ValueError):
    """A layer's head-pages do not fit in the compact blocks (the ``K`` bound was violated)."""


@dataclass
class LayerGather:
    """One layer's copy list: entry ``e`` copies token ``src_positions[e]`` of head ``head[e]``
    to slot ``dst_slot[e]`` of head-page ``dst_page[e]``. All ``[N]`` int64, ``N = sum_g B[l, g]``,
    grouped by head (ascending), positions ascending within a head."""

    head: torch.Tensor
    src_positions: torch.Tensor
    dst_page: torch.Tensor
    dst_slot: torch.Tensor


@dataclass
class KeyOnlyGather(LayerGather):
    """One layer's key-only copy list: key of token ``src_positions[e]`` of head ``head[e]`` to
    half ``half[e]`` (0: the slot's K half, 1: its V half) of slot ``dst_slot[e]`` of head-page
    ``dst_page[e]``. Grouped by head, positions ascending; entries ``2i`` and ``2i + 1`` share
    a slot (each head holds an even number)."""

    half: torch.Tensor


@dataclass
class KeyOnlyPlan:
    """Every layer's :class:`KeyOnlyGather` concatenated in layer order, as in
    :class:`CompactionPlan`; ``lens [L, Hkv]`` key-only tokens per (layer, head)."""

    lens: torch.Tensor
    layer: torch.Tensor
    head: torch.Tensor
    src_positions: torch.Tensor
    dst_page: torch.Tensor
    dst_slot: torch.Tensor
    half: torch.Tensor
    offsets: torch.Tensor

    def layer_gather(self, layer: int) -> KeyOnlyGather:
        lo, hi = int(self.offsets[layer]), int(self.offsets[layer + 1])
        return KeyOnlyGather(self.head[lo:hi], self.src_positions[lo:hi], self.dst_page[lo:hi], self.dst_slot[lo:hi],
                             self.half[lo:hi])


@dataclass
class CompactionPlan:
    """Head-page assignment and copy lists of one request's compaction.

    Attributes
    ----------
    block_size, num_kv_heads : cache geometry.
    compact_block_ids : the ``K`` freshly allocated blocks (same ids in every layer).
    head_pages : ``[l][g]`` list of head-page ids (``block * Hkv + plane``), in fill order.
    lens : ``[L, Hkv]`` int64 tokens kept per (layer, head).
    layer, head, src_positions, dst_page, dst_slot : ``[N]`` int64, every layer's
        :class:`LayerGather` concatenated in layer order (``layer[e]`` says which).
    offsets : ``[L + 1]`` int64; layer ``l``'s entries are ``offsets[l]:offsets[l + 1]``.
    key_only : VECTOR's key-only tokens (``None`` without them); the attributes above are the
        whole tokens only.
    """

    block_size: int
    num_kv_heads: int
    compact_block_ids: list[int]
    head_pages: list[list[list[int]]]
    lens: torch.Tensor
    layer: torch.Tensor
    head: torch.Tensor
    src_positions: torch.Tensor
    dst_page: torch.Tensor
    dst_slot: torch.Tensor
    offsets: torch.Tensor
    key_only: Optional[KeyOnlyPlan] = None

    @property
    def num_layers(self) -> int:
        return len(self.head_pages)

    def slots(self) -> torch.Tensor:
        """``[L, Hkv]`` int64 slots used per (layer, head): whole tokens + key-only pairs."""
        return self.lens if self.key_only is None else self.lens + self.key_only.lens // 2

    def layer_gather(self, layer: int) -> LayerGather:
        lo, hi = int(self.offsets[layer]), int(self.offsets[layer + 1])
        return LayerGather(self.head[lo:hi], self.src_positions[lo:hi], self.dst_page[lo:hi], self.dst_slot[lo:hi])

    def pages_used(self) -> int:
        """Head-pages used over all layers."""
        return sum(len(p) for layer in self.head_pages for p in layer)


def assign_head_pages(counts: Sequence[int], compact_block_ids: Sequence[int], num_kv_heads: int) -> list[list[int]]:
    """Head-page ids for one layer whose head ``g`` needs ``counts[g]`` pages (rule in module doc).

    Raises :class:`CompactRegionOverflow` when ``sum(counts) > Hkv * K``.
    """
    blocks = [int(b) for b in compact_block_ids]  # a few ints: plain Python, no tensor ops
    need = [int(c) for c in counts]
    num_blocks = len(blocks)
    if len(need) != num_kv_heads:
        raise ValueError(f"{len(need)} page counts for {num_kv_heads} KV heads")
    if sum(need) > num_kv_heads * num_blocks:
        raise CompactRegionOverflow(
            f"layer needs {sum(need)} head-pages (per head {need}), "
            f"{num_blocks} compact blocks hold {num_kv_heads * num_blocks}"
        )
    own = [min(n, num_blocks) for n in need]
    # plane p of compact block j is head-page blocks[j] * Hkv + p; the free ones in block-then-plane order
    free_pages = [b * num_kv_heads + p for j, b in enumerate(blocks) for p in range(num_kv_heads) if j >= own[p]]
    result, taken = [], 0
    for g in range(num_kv_heads):
        extra = need[g] - own[g]
        result.append([b * num_kv_heads + g for b in blocks][: own[g]] + free_pages[taken : taken + extra])
        taken += extra
    return result


def plan_compaction(
    kept: KeptSet, compact_block_ids: Sequence[int], block_size: int, num_kv_heads: int
) -> CompactionPlan:
    """Assign head-pages to every (layer, head) of ``kept`` and build the copy lists.

    Parameters
    ----------
    kept : per layer, per KV head, sorted token positions (``kept.indices[l][g]``).
    compact_block_ids : the ``K`` blocks allocated for the compact region.
    block_size, num_kv_heads : cache geometry (``Hkv`` must match ``kept``).
    """
    if block_size < 1:
        raise ValueError(f"block_size={block_size}: expected >= 1")
    if len(set(int(b) for b in compact_block_ids)) != len(compact_block_ids):
        raise ValueError(f"compact_block_ids repeat a block: {list(compact_block_ids)}")
    if tuple(kept.head_budgets.shape) != (kept.num_layers, num_kv_heads):
        raise ValueError(f"head_budgets shape {tuple(kept.head_budgets.shape)} != "
                         f"(num_layers={kept.num_layers}, num_kv_heads={num_kv_heads})")
    key_only = kept.key_only
    if key_only is not None and len(key_only) != kept.num_layers:
        raise ValueError(f"key_only has {len(key_only)} layers, indices {kept.num_layers}")
    budgets = kept.head_budgets.to(torch.int64).tolist()
    head_pages, lens, ko_lens, ko_gathers = [], [], [], []
    for layer, heads in enumerate(kept.indices):
        if len(heads) != num_kv_heads:
            raise ValueError(f"layer {layer} has {len(heads)} heads, expected num_kv_heads={num_kv_heads}")
        layer_lens = [int(h.numel()) for h in heads]
        ko = key_only[layer] if key_only is not None else None
        if ko is not None and len(ko) != num_kv_heads:
            raise ValueError(f"layer {layer} has {len(ko)} key-only heads, expected num_kv_heads={num_kv_heads}")
        layer_ko = [int(h.numel()) for h in ko] if ko is not None else [0] * num_kv_heads
        if any(n % 2 for n in layer_ko):
            raise ValueError(f"layer {layer}: key-only counts {layer_ko} are not even (two share a slot)")
        slots = [w + k // 2 for w, k in zip(layer_lens, layer_ko)]
        if slots != budgets[layer]:
            raise ValueError(f"layer {layer}: kept slots {slots} != head_budgets {budgets[layer]}")
        try:
            pages = assign_head_pages([-(-n // block_size) for n in slots], compact_block_ids, num_kv_heads)
        except CompactRegionOverflow as exc:
            raise CompactRegionOverflow(f"layer {layer}: {exc}") from None
        head_pages.append(pages)
        lens.append(layer_lens)
        if ko is not None:
            ko_lens.append(layer_ko)
            ko_gathers.append(_key_only_gather(ko, pages, torch.tensor(layer_lens), torch.tensor(layer_ko),
                                               block_size))
    lens = torch.tensor(lens, dtype=torch.int64).view(len(lens), num_kv_heads)
    return CompactionPlan(
        block_size=block_size,
        num_kv_heads=num_kv_heads,
        compact_block_ids=[int(b) for b in compact_block_ids],
        head_pages=head_pages,
        lens=lens,
        **_whole_gather(kept.indices, head_pages, lens, block_size),
        key_only=None if key_only is None else KeyOnlyPlan(
            lens=torch.tensor(ko_lens, dtype=torch.int64).view(len(ko_lens), num_kv_heads),
            **_concatenated(ko_gathers, ("head", "src_positions", "dst_page", "dst_slot", "half"))),
    )


def _whole_gather(indices: list[list[torch.Tensor]], head_pages: list[list[list[int]]], lens: torch.Tensor,
                  block_size: int) -> dict[str, torch.Tensor]:
    """Every layer's :class:`LayerGather` of the whole tokens at once, concatenated in layer order
    (``layer``, ``head``, ``src_positions``, ``dst_page``, ``dst_slot``, ``offsets``): token ``i``
    of head ``g`` of layer ``l`` to slot ``i % bs`` of page ``head_pages[l][g][i // bs]``."""
    num_layers, num_kv_heads = lens.shape
    flat = lens.flatten()
    group = torch.repeat_interleave(torch.arange(flat.numel()), flat)  # (layer, head) of each entry
    rank = torch.arange(group.numel()) - (torch.cumsum(flat, 0) - flat)[group]
    width = max([len(p) for layer in head_pages for p in layer] + [1])
    table = torch.tensor([p + [-1] * (width - len(p)) for layer in head_pages for p in layer],
                         dtype=torch.int64).view(-1, width)
    src = torch.cat([h.to(torch.int64) for heads in indices for h in heads]) if group.numel() else \
        torch.zeros(0, dtype=torch.int64)
    offsets = torch.zeros(num_layers + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lens.sum(1), 0)
    return {"layer": group // num_kv_heads, "head": group % num_kv_heads, "src_positions": src,
            "dst_page": table[group, rank // block_size], "dst_slot": rank % block_size, "offsets": offsets}


def _concatenated(gathers: list[LayerGather], names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """``layer``, ``offsets`` and each of ``names`` of every layer's gather, concatenated."""
    sizes = torch.tensor([g.head.numel() for g in gathers], dtype=torch.int64)
    offsets = torch.zeros(len(gathers) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(sizes, 0)
    out = {name: _concat(gathers, name) for name in names}
    return {"layer": torch.repeat_interleave(torch.arange(len(gathers)), sizes), **out, "offsets": offsets}


def _concat(gathers: list[LayerGather], name: str) -> torch.Tensor:
    return torch.cat([getattr(g, name) for g in gathers]) if gathers else torch.zeros(0, dtype=torch.int64)


def _key_only_gather(heads: list[torch.Tensor], pages: list[list[int]], whole: torch.Tensor, lens: torch.Tensor,
                     block_size: int) -> KeyOnlyGather:
    """Key-only token ``j`` of head ``g`` (``j``-th smallest position) to half ``j % 2`` of the
    head's slot ``whole[g] + j // 2``."""
    table = _padded(pages)
    head = torch.repeat_interleave(torch.arange(len(heads)), lens)
    rank = torch.arange(int(lens.sum())) - (torch.cumsum(lens, 0) - lens)[head]
    slot = whole[head] + rank // 2
    src = torch.cat([h.to(torch.int64) for h in heads]) if heads else torch.zeros(0, dtype=torch.int64)
    return KeyOnlyGather(head=head, src_positions=src, dst_page=table[head, slot // block_size],
                         dst_slot=slot % block_size, half=rank % 2)


def _padded(pages: list[list[int]], width: int | None = None) -> torch.Tensor:
    width = max([len(p) for p in pages] + [1]) if width is None else width
    table = torch.full((len(pages), width), -1, dtype=torch.int64)
    for g, p in enumerate(pages):
        table[g, : len(p)] = torch.as_tensor(p, dtype=torch.int64)
    return table


def page_table_tensor(plan: CompactionPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pages [L, Hkv, max_pages] int32 padded with -1, lens [L, Hkv] int32)``.

    ``pages[l]`` / ``lens[l]`` (with a batch dim added) are the ``compact_pages`` /
    ``compact_lens`` of :mod:`vllm_kvevict.kernels` for layer ``l``.
    """
    width = max([len(p) for layer in plan.head_pages for p in layer] + [1])
    pages = torch.stack([_padded(layer, width) for layer in plan.head_pages]) if plan.head_pages else \
        torch.full((0, plan.num_kv_heads, width), -1, dtype=torch.int64)
    return pages.to(torch.int32), plan.lens.to(torch.int32)


def kept_positions_tensor(plan: CompactionPlan) -> torch.Tensor:
    """``[L, Hkv, max_kept]`` int32 kept positions per (layer, head), padded with -1 past ``lens``.

    With :func:`page_table_tensor`, the ``kept_pos`` / ``kept_lens`` / ``dest_pages`` arguments of
    :func:`vllm_kvevict.kernels.compaction.compact` for one layer (add a batch dim).
    """
    num_layers, num_kv_heads = plan.lens.shape
    width = max(int(plan.lens.max()) if plan.lens.numel() else 0, 1)
    out = torch.full((num_layers, num_kv_heads, width), -1, dtype=torch.int64)
    flat_lens = plan.lens.flatten()  # entries are grouped by (layer, head) in this order
    group_start = torch.cumsum(flat_lens, 0) - flat_lens
    starts = group_start[plan.layer * num_kv_heads + plan.head]
    rank = torch.arange(plan.layer.numel()) - starts
    out[plan.layer, plan.head, rank] = plan.src_positions
    return out.to(torch.int32)
