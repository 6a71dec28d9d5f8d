"""One interface for reading and writing a layer's paged KV cache, whatever its layout.

Every vLLM attention backend the plugin supports stores one layer's cache with the logical
shape ``[num_blocks, Hkv, block_size, 2 * head_dim]``: per (block, KV head) a *page* of
``block_size`` slots holding a key and a value. They differ in where an element of a page
lives: vLLM's GPU backends (FlashAttention, Triton) keep the key in ``[..., :d]`` and the value
in ``[..., d:]`` of the slot's row (:mod:`.gpu`); vLLM's CPU backend packs each page in an
ISA-specific order (:mod:`.cpu`). A layout only says how to read and write entries addressed
by (block, plane, slot) (plane ``g`` of block ``b`` is head-page ``b * Hkv + g``); everything
the plugin does with a cache is built on those two operations here, once:

* :meth:`PagedLayout.gather`: one request's positions ``0 .. length - 1`` for scoring;
* :meth:`PagedLayout.compact`: copy kept entries into head-pages (every layer's copy list
  checked once per request, :meth:`PagedLayout.plan_copies`; whole pages copied as pages,
  :meth:`PagedLayout.read_pages` / :meth:`PagedLayout.write_pages`; a layout whose K and V are
  head-major views runs the one compaction, :func:`vllm_kvevict.cache.compact.compact_layer`), VECTOR's key-only
  tokens two to a slot (:meth:`PagedLayout.compact_key_only`, read back by
  :meth:`PagedLayout.read_key_only`);
  :meth:`PagedLayout.compact_from`: the same from explicit sources (decode-time recompaction of
  a compact region + tail);
* :meth:`PagedLayout.read_region` / :meth:`PagedLayout.read_tail`: what a compacted request
  attends (its compact region, then its positional tail).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

import torch

from vllm_kvevict.cache.compact import unpack_key_pairs
from vllm_kvevict.cache.copies import LayerCopies, PlanCopies, plan_copies
from vllm_kvevict.cache.page_table import CompactionPlan


class PagedLayout(ABC):
    """How one layer's ``[num_blocks, Hkv, block_size, 2 * head_dim]`` cache holds its entries."""

    def __init__(self, num_kv_heads: int, block_size: int, head_dim: int) -> None:
        self.num_kv_heads = num_kv_heads
        self.block_size = block_size
        self.head_dim = head_dim

    # ----------------------------------------------------------------- the two primitives
    @abstractmethod
    def read(self, kv_cache: torch.Tensor, block: torch.Tensor, plane: torch.Tensor,
             slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys, values)``, each ``[*index.shape, d]`` in the cache's dtype (copies).

        ``block``, ``plane``, ``slot``: int64 index tensors of one shape (broadcastable).
        """

    @abstractmethod
    def write(self, kv_cache: torch.Tensor, block: torch.Tensor, plane: torch.Tensor, slot: torch.Tensor,
              keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``keys``/``values [N, d]`` at the ``[N]`` entries ``(block, plane, slot)``."""

    # ----------------------------------------------------------------- built on them
    def gather(self, kv_cache: torch.Tensor, block_ids: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys, values)`` ``[Hkv, length, d]`` of positions ``0 .. length - 1``; position
        ``p`` is in block ``block_ids[p // block_size]``."""
        pos = torch.arange(length, device=kv_cache.device)
        block = block_ids.to(kv_cache.device, torch.int64)[pos // self.block_size]
        heads = torch.arange(self.num_kv_heads, device=kv_cache.device)
        return self.read(kv_cache, block[None, :], heads[:, None], (pos % self.block_size)[None, :])

    def read_pages(self, kv_cache: torch.Tensor, block: torch.Tensor, plane: torch.Tensor) -> torch.Tensor:
        """``[N, block_size, 2 * head_dim]`` copies of whole pages ``(block, plane)`` (``[N]``
        int64): every slot's key and value, in the layout's own order within the page."""
        return kv_cache[block, plane]

    def write_pages(self, kv_cache: torch.Tensor, block: torch.Tensor, plane: torch.Tensor,
                    pages: torch.Tensor) -> None:
        """Store :meth:`read_pages`' ``pages`` at the ``[N]`` pages ``(block, plane)``."""
        kv_cache[block, plane] = pages

    def plan_copies(self, kv_cache: torch.Tensor, source_blocks: torch.Tensor, plan: CompactionPlan) -> PlanCopies:
        """Every layer's checked copies of ``plan`` (:func:`vllm_kvevict.cache.copies.plan_copies`),
        once per request, for :meth:`compact` of each layer (every layer's cache has
        ``kv_cache``'s shape and device)."""
        return plan_copies(plan, source_blocks, kv_cache.shape[0], self.num_kv_heads, self.block_size,
                           kv_cache.device)

    def compact(self, kv_cache: torch.Tensor, source_blocks: torch.Tensor, plan: CompactionPlan, layer: int,
                copies: Optional[PlanCopies] = None) -> None:
        """Copy layer ``layer``'s kept entries of ``plan`` from the request's positional
        ``source_blocks`` into their head-pages, keys and values (key-only tokens: their keys,
        two to a slot), in place: whole pages as pages, the rest entry by entry. Every source is
        read before any write; a destination block may not be a source block. ``copies``:
        :meth:`plan_copies` of this request (computed here when not given)."""
        copies = self._copies(kv_cache, source_blocks, plan, copies)
        self._copy(kv_cache, copies.layer_copies(layer), whole=True)

    def compact_key_only(self, kv_cache: torch.Tensor, source_blocks: torch.Tensor, plan: CompactionPlan,
                         layer: int, copies: Optional[PlanCopies] = None) -> None:
        """Only the key-only part of :meth:`compact` (a layout that copies whole entries its own
        way calls this after it: the sources are positional blocks, never compact ones)."""
        if plan.key_only is not None:
            copies = self._copies(kv_cache, source_blocks, plan, copies)
            self._copy(kv_cache, copies.layer_copies(layer), whole=False)

    def _copies(self, kv_cache, source_blocks, plan: CompactionPlan, copies: Optional[PlanCopies]) -> PlanCopies:
        if copies is None:
            return self.plan_copies(kv_cache, source_blocks, plan)
        if copies.num_blocks != kv_cache.shape[0]:
            raise ValueError(f"copies planned for a cache of {copies.num_blocks} blocks, this one has "
                             f"{kv_cache.shape[0]}")
        return copies

    def _copy(self, kv_cache: torch.Tensor, c: LayerCopies, whole: bool) -> None:
        """Read every source of ``c`` (its whole-token part only if ``whole``), then write."""
        pages, entries, key_only = c.pages, c.entries, c.key_only
        page_data = self.read_pages(kv_cache, pages.src_block, pages.src_plane) \
            if whole and pages.src_block.numel() else None
        entry_data = self.read(kv_cache, entries.src_block, entries.head, entries.src_slot) \
            if whole and entries.src_block.numel() else None
        keys = self.read(kv_cache, key_only.src_block, key_only.head, key_only.src_slot)[0] \
            if key_only is not None and key_only.src_block.numel() else None
        if page_data is not None:
            self.write_pages(kv_cache, pages.dst_block, pages.dst_plane, page_data)
        if entry_data is not None:
            self.write(kv_cache, entries.dst_block, entries.dst_plane, entries.dst_slot, *entry_data)
        if keys is not None:  # entry 2i in slot i's K half, 2i + 1 in its V half (pairs checked in plan_copies)
            self.write(kv_cache, key_only.dst_block[0::2], key_only.dst_plane[0::2], key_only.dst_slot[0::2],
                       keys[0::2], keys[1::2])

    def read_key_only(self, kv_cache: torch.Tensor, block: torch.Tensor, plane: torch.Tensor, slot: torch.Tensor,
                      half: torch.Tensor) -> torch.Tensor:
        """``[M, d]`` the keys of key-only entries (``half``: which half of its slot each is in)."""
        k_half, v_half = self.read(kv_cache, block, plane, slot)
        return unpack_key_pairs(k_half, v_half, half)

    def compact_from(self, kv_cache: torch.Tensor, sources: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                     plan: CompactionPlan, layer: int) -> None:
        """:meth:`compact` from explicit ``(block, plane, slot)`` sources, one per entry of
        ``plan.layer_gather(layer)`` in its order: a decode-time recompaction reads each head's
        compact region and the positional tail. Every source is read before any write; a
        destination block may not be a source block."""
        if plan.key_only is not None:
            raise ValueError("key-only tokens are not recompacted (VECTOR is not evicted during decode)")
        gather = plan.layer_gather(layer)
        if gather.head.numel() == 0:
            return
        device = kv_cache.device
        src_block, src_plane, src_slot = (t.to(device, torch.int64) for t in sources)
        dst_page = gather.dst_page.to(device)
        dst_block = dst_page // self.num_kv_heads
        if src_block.shape != dst_page.shape:
            raise ValueError(f"{src_block.numel()} sources for {dst_page.numel()} entries")
        if bool(torch.isin(dst_block, src_block).any()):
            raise ValueError("a compact block is also a source block of this compaction")
        if int(dst_block.max()) >= kv_cache.shape[0] or int(dst_page.min()) < 0 or int(src_block.min()) < 0:
            raise ValueError(f"an entry out of range for a cache of {kv_cache.shape[0]} blocks")
        keys, values = self.read(kv_cache, src_block, src_plane, src_slot)
        self.write(kv_cache, dst_block, dst_page % self.num_kv_heads, gather.dst_slot.to(device), keys, values)

    def read_region(self, kv_cache: torch.Tensor, block: torch.Tensor, plane: torch.Tensor,
                    slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys, values)`` ``[N, d]`` of a compact region's entries (grouped by head)."""
        return self.read(kv_cache, block, plane, slot)

    def read_tail(self, kv_cache: torch.Tensor, tail_blocks: torch.Tensor, first_position: int,
                  end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys, values)`` ``[T, Hkv, d]`` of positions ``first_position .. end - 1``, every head.

        ``tail_blocks``: the request's positional block ids from block ``first_position // bs`` on.
        """
        pos = torch.arange(first_position, end, device=kv_cache.device)
        idx = pos // self.block_size - first_position // self.block_size
        block = tail_blocks.to(kv_cache.device, torch.int64)[idx]
        heads = torch.arange(self.num_kv_heads, device=kv_cache.device)
        return self.read(kv_cache, block[:, None], heads[None, :], (pos % self.block_size)[:, None])
