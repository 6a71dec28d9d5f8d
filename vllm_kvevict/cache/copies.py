"""Every layer's copies of one compaction, checked and computed once per request.

:func:`copy_indices` is one layer's checked copy list; :func:`plan_copies` is the same for
every layer of a :class:`~vllm_kvevict.cache.page_table.CompactionPlan` at once (one set of
torch ops per request instead of one per layer; the checks are per layer, as each layer is its
own cache), and splits it for the copy: entries that fill a whole head-page from a whole
source page, slot for slot (head granularity's whole pages per head: every kept run but a
prompt's partial last one), are copied as pages; the rest entry by entry.
:meth:`PlanCopies.layer` gives back exactly :func:`copy_indices` of ``plan.layer_gather(l)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from vllm_kvevict.cache.compact import CopyIndices, _checked, _shared_block
from vllm_kvevict.cache.page_table import CompactionPlan


@dataclass
class PageCopies:
    """Whole pages to copy: page ``(src_block, src_plane)`` onto ``(dst_block, dst_plane)``, ``[P]`` int64."""

    src_block: torch.Tensor
    src_plane: torch.Tensor
    dst_block: torch.Tensor
    dst_plane: torch.Tensor

    def __getitem__(self, span: slice) -> "PageCopies":
        return PageCopies(self.src_block[span], self.src_plane[span], self.dst_block[span], self.dst_plane[span])


@dataclass
class LayerCopies:
    """What one layer's compaction copies: whole ``pages``, single ``entries`` (the rest of
    the whole tokens) and ``key_only`` entries (their keys, two to a slot; ``None`` if none)."""

    pages: PageCopies
    entries: CopyIndices
    key_only: Optional[CopyIndices]


@dataclass
class PlanCopies:
    """:func:`plan_copies`: every layer's checked copies, concatenated in layer order.

    ``whole`` / ``key_only``: the :class:`CopyIndices` of the whole and the key-only tokens
    (``key_only`` ``None`` without them); ``pages`` and ``entries`` split ``whole`` into whole
    pages and single entries. Each ``*_offsets`` is ``[L + 1]`` Python ints: layer ``l``'s part
    is ``offsets[l]:offsets[l + 1]``.
    """

    num_blocks: int
    whole: CopyIndices
    whole_offsets: list[int]
    pages: PageCopies
    page_offsets: list[int]
    entries: CopyIndices
    entry_offsets: list[int]
    key_only: Optional[CopyIndices] = None
    key_only_offsets: Optional[list[int]] = None

    def layer(self, layer: int) -> CopyIndices:
        """Layer ``layer``'s whole-token copies: :func:`copy_indices` of its gather."""
        return self.whole.take(_span(self.whole_offsets, layer))

    def key_only_layer(self, layer: int) -> Optional[CopyIndices]:
        """Layer ``layer``'s key-only copies (:func:`copy_indices` of its key-only gather)."""
        return None if self.key_only is None else self.key_only.take(_span(self.key_only_offsets, layer))

    def layer_copies(self, layer: int) -> LayerCopies:
        return LayerCopies(self.pages[_span(self.page_offsets, layer)],
                           self.entries.take(_span(self.entry_offsets, layer)), self.key_only_layer(layer))


def plan_copies(plan: CompactionPlan, block_table: torch.Tensor, num_blocks: int, num_kv_heads: int, block_size: int,
                device=None) -> PlanCopies:
    """Checked copies of every layer of ``plan``: the checks of :func:`copy_indices`, per layer
    (kept position past the table, destination out of range, a destination block that is a
    source block of its layer), and for key-only tokens also a whole-token destination block
    that is a key-only source of its layer, and key-only entries in (K half, V half) pairs."""
    table = torch.as_tensor(block_table, dtype=torch.int64).to(device)
    layer = plan.layer.to(device)
    offsets = plan.offsets.tolist()
    whole = _checked(layer, plan, table, num_blocks, num_kv_heads, block_size, device) if layer.numel() else \
        CopyIndices.empty(device)
    key_only, key_only_offsets = None, None
    ko = plan.key_only
    if ko is not None:
        key_only_offsets = ko.offsets.tolist()
        key_only = _key_only(ko, layer, whole, table, num_blocks, num_kv_heads, block_size, device)
    pages, page_offsets, entries, entry_offsets = _split_pages(layer, whole, offsets, num_kv_heads, block_size)
    return PlanCopies(num_blocks, whole, offsets, pages, page_offsets, entries, entry_offsets, key_only,
                      key_only_offsets)


def _key_only(ko, whole_layer: torch.Tensor, whole: CopyIndices, table, num_blocks: int, num_kv_heads: int,
              block_size: int, device) -> CopyIndices:
    counts = ko.offsets[1:] - ko.offsets[:-1]
    if ko.layer.numel() == 0:
        return CopyIndices.empty(device)
    # pack_key_pairs's check, every layer at once (each layer's count even: then its halves are
    # 0, 1, 0, 1, ... exactly when the concatenation's are)
    if bool((counts % 2).any()) or not torch.equal(ko.half.to(torch.int64).cpu(), torch.arange(ko.half.numel()) % 2):
        raise ValueError(f"key-only entries per layer {counts.tolist()} are not pairs of (K half, V half)")
    layer = ko.layer.to(device)
    c = _checked(layer, ko, table, num_blocks, num_kv_heads, block_size, device)
    if whole_layer.numel() and _shared_block(whole_layer, whole.dst_block, layer, c.src_block):
        raise ValueError("a compact block is also a source block of this compaction")
    return c


def _split_pages(layer: torch.Tensor, c: CopyIndices, offsets: list[int], num_kv_heads: int, block_size: int):
    """``(pages, page offsets, entries, entry offsets)``: each run of ``block_size`` entries of
    ``c`` from one source page to one destination page, slot ``i`` of the run from and to slot
    ``i`` (so every slot of the page, as it is), as a page copy; the other entries as they are."""
    n, device = c.src_block.numel(), layer.device
    src, dst = c.src_block * num_kv_heads + c.head, c.dst_block * num_kv_heads + c.dst_plane
    new_run = torch.ones(n, dtype=torch.bool, device=device)
    if n > 1:
        new_run[1:] = (layer[1:] != layer[:-1]) | (src[1:] != src[:-1]) | (dst[1:] != dst[:-1])
    starts = torch.nonzero(new_run).flatten()
    lengths = torch.diff(starts, append=torch.tensor([n], device=device))
    rank = torch.arange(n, device=device) - torch.repeat_interleave(starts, lengths)
    off = (c.src_slot != rank) | (c.dst_slot != rank)
    off_before = _exclusive_cumsum(off)
    whole_run = (lengths == block_size) & (off_before[starts + lengths] == off_before[starts])
    first = starts[whole_run]
    pages = PageCopies(c.src_block[first], c.head[first], c.dst_block[first], c.dst_plane[first])
    rest = ~torch.repeat_interleave(whole_run, lengths)
    entries = c.take(rest)
    bounds = torch.tensor(offsets, dtype=torch.int64, device=device)
    return pages, torch.searchsorted(first, bounds).tolist(), entries, _exclusive_cumsum(rest)[bounds].tolist()


def _exclusive_cumsum(mask: torch.Tensor) -> torch.Tensor:
    """``[n + 1]``: how many of ``mask``'s first ``i`` entries are set, ``i = 0 .. n``."""
    out = torch.zeros(mask.numel() + 1, dtype=torch.int64, device=mask.device)
    torch.cumsum(mask.to(torch.int64), 0, out=out[1:])
    return out


def _span(offsets: list[int], layer: int) -> slice:
    return slice(offsets[layer], offsets[layer + 1])

