"""Compacted (head-granular) rows on a GPU: their page tables on the device, and one two-segment
decode per layer for all of them.

A compacted request's compact region never changes after its compaction, so its head-page table
(``[L, Hkv, P]`` head-page ids and ``[L, Hkv]`` lengths, :func:`region_page_table`) is sent to
the device once, into a slot of a persistent pool (:class:`PagePool`). Each step the builder
gathers, on the device, the slots of the step's head rows and their positional block-table rows
into persistent buffers (:class:`HeadRowBuffers`); the host sends only five int32 numbers per
query (one non-blocking copy from pinned memory). The impl then calls
:func:`vllm_kvevict.kernels.paged_decode_attention` once per layer over every head row
(:func:`decode_head_rows`): each query is one kernel row (its length ends at its own position, so
a row with several queries is causal), compact region first, then the positional tail from
``region.tail_start``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from vllm_kvevict.kernels import paged_decode_attention
from vllm_kvevict.vllm.backends.gpu_tables import grown, send, staging
from vllm_kvevict.vllm.layouts import SplitHeadDimLayout
from vllm_kvevict.vllm.step import CompactRegion, EvictionStep, HeadRow


def region_page_table(region: CompactRegion, num_kv_heads: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pages [L, Hkv, P] int32, lens [L, Hkv] int32)``: head ``g`` of layer ``l`` holds its
    ``lens[l, g]`` kept tokens in head-pages ``pages[l, g, :ceil(lens / bs)]`` (``block * Hkv +
    plane``; ``-1`` padding). The same table as :func:`vllm_kvevict.cache.page_table_tensor` of
    the request's plan, read back from its :class:`CompactRegion` (entry ``i`` of a head is in its
    ``i // bs``-th page, slot ``i % bs``). Refuses VECTOR's key-only pairs (this path does not
    carry them to the kernel yet: docs/VECTOR.md)."""
    if region.key_only is not None:
        raise ValueError("the GPU head-row path does not carry key-only head-pages (VECTOR) yet: torch path only")
    lens = region.lens.to(torch.int64)
    num_layers = lens.shape[0]
    width = max(1, int(((lens + block_size - 1) // block_size).max()) if lens.numel() else 1)
    pages = torch.full((num_layers, num_kv_heads, width), -1, dtype=torch.int32)
    for layer in range(num_layers):
        ids = region.block[layer] * num_kv_heads + region.plane[layer]
        head = torch.repeat_interleave(torch.arange(num_kv_heads), lens[layer])
        rank = torch.arange(ids.numel()) - (torch.cumsum(lens[layer], 0) - lens[layer])[head]
        first = rank % block_size == 0
        pages[layer, head[first], rank[first] // block_size] = ids[first].to(torch.int32)
    return pages, lens.to(torch.int32)


class PagePool:
    """Device copies of compacted requests' page tables, one slot per request.

    ``pages [L, slots, Hkv, P]`` and ``lens [L, slots, Hkv]`` int32, grown as needed. A request's
    table is sent when its region is new to the pool (a request compacted again after a reset
    has a new region); slots of requests absent from the step are reused only when no slot is
    free.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.pages: Optional[torch.Tensor] = None
        self.lens: Optional[torch.Tensor] = None
        self._entries: dict[str, tuple[int, CompactRegion]] = {}

    def slots(self, rows: Sequence[HeadRow], num_kv_heads: int, block_size: int) -> list[int]:
        """The slot of every row's page table (sending the tables not there yet)."""
        live = {row.req_id for row in rows}
        for row in rows:
            entry = self._entries.get(row.req_id)
            if entry is not None and entry[1] is row.region:
                continue
            slot = entry[0] if entry is not None else self._free_slot(live)
            self._upload(slot, row.region, num_kv_heads, block_size)
            self._entries[row.req_id] = (slot, row.region)
        return [self._entries[row.req_id][0] for row in rows]

    def _free_slot(self, live: set[str]) -> int:
        used = {slot for slot, _ in self._entries.values()}
        capacity = self.pages.shape[1] if self.pages is not None else 0
        free = [s for s in range(capacity) if s not in used]
        if not free:
            stale = [req_id for req_id in self._entries if req_id not in live]
            free = sorted(self._entries.pop(req_id)[0] for req_id in stale)
        return free[0] if free else len(used)

    def _upload(self, slot: int, region: CompactRegion, num_kv_heads: int, block_size: int) -> None:
        pages, lens = region_page_table(region, num_kv_heads, block_size)
        num_layers, _, width = pages.shape
        self.pages = grown(self.pages, (num_layers, slot + 1, num_kv_heads, width), torch.int32, self.device, fill=-1)
        self.lens = grown(self.lens, (num_layers, slot + 1, num_kv_heads), torch.int32, self.device)
        host = staging((num_layers, num_kv_heads, width + 1), torch.int32, self.device)
        host[..., :width], host[..., width] = pages, lens
        dev = send(host, self.device)
        self.pages[:, slot, :, :width].copy_(dev[..., :width])
        self.lens[:, slot].copy_(dev[..., width])


@dataclass(frozen=True)
class HeadRowTensors:
    """A step's compacted rows as the two-segment kernel reads them: one kernel row per query.

    Attributes
    ----------
    query_index : ``[Q]`` int64, the query's token in the step's flattened batch.
    pages, lens : ``[L, Q, Hkv, P]`` / ``[L, Q, Hkv]`` int32, each layer's compact region.
    table : ``[Q, W]`` int32, the request's positional block-table row (the tail's blocks).
    tail_start, seq_lens : ``[Q]`` int32: the tail is ``tail_start .. seq_lens - 1``.
    """

    query_index: torch.Tensor
    pages: torch.Tensor
    lens: torch.Tensor
    table: torch.Tensor
    tail_start: torch.Tensor
    seq_lens: torch.Tensor


class HeadRowBuffers:
    """The persistent buffers :class:`HeadRowTensors` are views of, and the page pool."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.pool = PagePool(device)
        self._ints: Optional[torch.Tensor] = None  # [5, Q] int32
        self._flat: dict[str, Optional[torch.Tensor]] = {"pages": None, "lens": None, "table": None}

    def _view(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        numel = 1
        for n in shape:
            numel *= n
        self._flat[name] = grown(self._flat[name], (numel,), torch.int32, self.device)
        return self._flat[name][:numel].view(shape)

    def prepare(self, step: EvictionStep, block_table: torch.Tensor, num_kv_heads: int,
                block_size: int) -> Optional[HeadRowTensors]:
        """The step's head rows on the device (``None`` if it has none); ``block_table``: the
        runner's positional ``[rows, W]`` table (before the step's rewrite)."""
        if not step.head_rows:
            return None
        batch_rows = list(step.head_rows)
        heads = [step.head_rows[r] for r in batch_rows]
        slots = self.pool.slots(heads, num_kv_heads, block_size)
        columns = []  # (query index, slot, batch row, tail start, length) per query
        for row, head, slot in zip(batch_rows, heads, slots):
            first = head.seq_len - head.num_queries
            columns += [(head.query_offset + i, slot, row, head.region.tail_start, first + i + 1)
                        for i in range(head.num_queries)]
        count = len(columns)
        host = staging((5, count), torch.int32, self.device)
        host.copy_(torch.tensor(columns, dtype=torch.int32).t())
        self._ints = grown(self._ints, (5, count), torch.int32, self.device)
        ints = self._ints[:, :count]
        ints.copy_(host, non_blocking=True)
        pool = self.pool
        num_layers, _, _, width = pool.pages.shape
        pages = self._view("pages", (num_layers, count, num_kv_heads, width))
        lens = self._view("lens", (num_layers, count, num_kv_heads))
        table = self._view("table", (count, block_table.shape[1]))
        slot_index = ints[1].long()
        torch.index_select(pool.pages, 1, slot_index, out=pages)
        torch.index_select(pool.lens, 1, slot_index, out=lens)
        torch.index_select(block_table.to(torch.int32), 0, ints[2].long(), out=table)
        return HeadRowTensors(ints[0].long(), pages, lens, table, ints[3], ints[4])


def decode_head_rows(rows: HeadRowTensors, layer_idx: int, query: torch.Tensor, kv_cache: torch.Tensor,
                     layout: SplitHeadDimLayout, output: torch.Tensor, num_heads: int, scale: float) -> None:
    """Overwrite the output of every head row for this layer: one kernel call (``query``,
    ``output``: ``[tokens, H * d]`` or ``[tokens, H, d]``)."""
    d = layout.head_dim
    q = query.view(query.shape[0], num_heads, d).index_select(0, rows.query_index)
    k_cache, v_cache = layout.key_value_views(kv_cache)
    out = paged_decode_attention(q, k_cache, v_cache, rows.pages[layer_idx], rows.lens[layer_idx], rows.table,
                                 rows.tail_start, rows.seq_lens, scale=scale)
    output.view(output.shape[0], num_heads, d).index_copy_(0, rows.query_index, out.to(output.dtype))
