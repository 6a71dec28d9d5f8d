"""Compacted (head-granular) rows on a GPU: their page tables on the device, and one two-segment
decode per layer for all of them.

A compacted request's compact region never changes after its compaction, so its head-page table
(``[L, Hkv, P]`` head-page ids and ``[L, Hkv]`` lengths, :func:`region_page_table`) and its
VECTOR key-only tokens' counts and positions (:func:`region_key_only`) are sent to the device
once, into a slot of a persistent pool (:class:`PagePool`). Each step the builder gathers, on the
device, the slots of the step's head rows and their positional block-table rows into persistent
buffers (:class:`HeadRowBuffers`); the host sends only five int32 numbers per query (one
non-blocking copy from pinned memory). The impl then calls
:func:`vllm_kvevict.kernels.paged_decode_attention` once per layer over every head row
(:func:`decode_head_rows`): each query is one kernel row (its length ends at its own position, so
a row with several queries is causal), compact region first, then the positional tail from
``region.tail_start``; in a layer where a row holds key-only tokens, with a
:class:`~vllm_kvevict.kernels.key_only_decode.KeyOnlySegment` of the layer's regression (the
artifact's tensors sent once, :class:`KeyOnlyWeights`). The kernel takes one regression per
call, so rows rebuilding values with different artifacts (``kv_vector_artifact`` per request)
are ordered into one span of queries per artifact and each span is one call
(:class:`HeadRowSpan`; the usual step has one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from vllm_kvevict.kernels import paged_decode_attention
from vllm_kvevict.kernels.key_only_decode import KeyOnlySegment
from vllm_kvevict.vllm.backends.gpu_tables import grown, send, staging
from vllm_kvevict.vllm.layouts import SplitHeadDimLayout
from vllm_kvevict.vllm.step import CompactRegion, EvictionStep, HeadRow


def region_page_table(region: CompactRegion, num_kv_heads: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pages [L, Hkv, P] int32, lens [L, Hkv] int32)``: head ``g`` of layer ``l`` holds its
    ``lens[l, g]`` whole tokens in head-pages ``pages[l, g, :ceil(lens / bs)]`` (``block * Hkv +
    plane``; ``-1`` padding). The same table as :func:`vllm_kvevict.cache.page_table_tensor` of
    the request's plan, read back from its :class:`CompactRegion` (entry ``i`` of a head is in its
    ``i // bs``-th page, slot ``i % bs``).

    With VECTOR's key-only tokens (``region.key_only``) the table also covers them, as the
    kernel reads them: key-only token ``j`` of head ``g`` in the head's slot ``lens[l, g] + j // 2``
    (K half if ``j`` is even, V half if odd), so ``ceil((W + n / 2) / bs)`` pages for a head of
    ``W`` whole and ``n`` key-only tokens; ``lens`` stays ``W``. Raises ``ValueError`` when an
    entry is not where that says (a page id, slot or half off the convention)."""
    lens = region.lens.to(torch.int64)
    ko = region.key_only
    slots = lens + (ko.lens.to(torch.int64) // 2 if ko is not None else 0)
    num_layers = lens.shape[0]
    width = max(1, int(((slots + block_size - 1) // block_size).max()) if slots.numel() else 1)
    pages = torch.full((num_layers, num_kv_heads, width), -1, dtype=torch.int32)
    for layer in range(num_layers):
        entries = _layer_entries(region, layer, num_kv_heads)
        for ids, _, head, seg in entries:
            pages[layer, head, seg // block_size] = ids
        for ids, slot, head, seg in entries:  # every entry of a page names the same page, in its slot
            if not (torch.equal(pages[layer, head, seg // block_size], ids) and torch.equal(slot, seg % block_size)):
                raise ValueError(f"layer {layer}: a compacted entry is not in its head's slot order")
    return pages, lens.to(torch.int32)


def _layer_entries(region: CompactRegion, layer: int, num_kv_heads: int) -> list[tuple[torch.Tensor, ...]]:
    """``(head-page id, slot, head, index in the head's segment)`` of layer ``layer``'s whole
    entries, then of its key-only ones (token ``j`` of a head at ``W + j // 2``; refused unless
    in half ``j % 2``)."""
    lens, ko = region.lens[layer].to(torch.int64), region.key_only
    head, rank = _grouped(lens)
    ids = (region.block[layer] * num_kv_heads + region.plane[layer]).to(torch.int32)
    entries = [(ids, region.slot[layer].to(torch.int64), head, rank)]
    if ko is not None:
        ko_head, ko_rank = _grouped(ko.lens[layer].to(torch.int64))
        if not torch.equal(ko.half[layer].to(torch.int64), ko_rank % 2):
            raise ValueError(f"layer {layer}: key-only entries are not in K, V half order (token j in half j % 2)")
        ko_ids = (ko.block[layer] * num_kv_heads + ko.plane[layer]).to(torch.int32)
        entries.append((ko_ids, ko.slot[layer].to(torch.int64), ko_head, lens[ko_head] + ko_rank // 2))
    return entries


def region_key_only(region: CompactRegion, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lens [L, Hkv] int32, positions [L, Hkv, M] int32)``: VECTOR's key-only tokens per head
    (zeros without them) and the position of each (token ``j``, the ``j``-th smallest, at
    ``positions[l, g, j]``; ``0`` padding): the ``lens`` / ``positions`` of a
    :class:`~vllm_kvevict.kernels.key_only_decode.KeyOnlySegment`."""
    num_layers = region.lens.shape[0]
    ko = region.key_only
    if ko is None:
        return (torch.zeros((num_layers, num_kv_heads), dtype=torch.int32),
                torch.zeros((num_layers, num_kv_heads, 1), dtype=torch.int32))
    lens = ko.lens.to(torch.int64)
    width = max(1, int(lens.max()) if lens.numel() else 1)
    positions = torch.zeros((num_layers, num_kv_heads, width), dtype=torch.int32)
    for layer in range(num_layers):
        head, rank = _grouped(lens[layer])
        positions[layer, head, rank] = ko.positions[layer].to(torch.int32)
    return lens.to(torch.int32), positions


def _grouped(lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The head and the rank within its head of each entry of entries grouped by head."""
    head = torch.repeat_interleave(torch.arange(lens.numel()), lens)
    return head, torch.arange(head.numel()) - (torch.cumsum(lens, 0) - lens)[head]


class PagePool:
    """Device copies of compacted requests' page tables, one slot per request.

    ``pages [L, slots, Hkv, P]`` and ``lens [L, slots, Hkv]`` int32 (:func:`region_page_table`),
    ``ko_lens [L, slots, Hkv]`` and ``ko_positions [L, slots, Hkv, M]`` int32
    (:func:`region_key_only`), grown as needed. A request's table is sent when its region is new
    to the pool (a request compacted again after a reset has a new region); slots of requests
    absent from the step are reused only when no slot is free.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.pages: Optional[torch.Tensor] = None
        self.lens: Optional[torch.Tensor] = None
        self.ko_lens: Optional[torch.Tensor] = None
        self.ko_positions: Optional[torch.Tensor] = None
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
        ko_lens, ko_positions = region_key_only(region, num_kv_heads)
        num_layers, _, width = pages.shape
        most = ko_positions.shape[-1]
        self.pages = grown(self.pages, (num_layers, slot + 1, num_kv_heads, width), torch.int32, self.device, fill=-1)
        self.lens = grown(self.lens, (num_layers, slot + 1, num_kv_heads), torch.int32, self.device)
        self.ko_lens = grown(self.ko_lens, (num_layers, slot + 1, num_kv_heads), torch.int32, self.device)
        self.ko_positions = grown(self.ko_positions, (num_layers, slot + 1, num_kv_heads, most), torch.int32,
                                  self.device)
        host = staging((num_layers, num_kv_heads, width + 2 + most), torch.int32, self.device)
        host[..., :width], host[..., width], host[..., width + 1] = pages, lens, ko_lens
        host[..., width + 2 :] = ko_positions
        dev = send(host, self.device)
        self.pages[:, slot, :, :width].copy_(dev[..., :width])
        self.lens[:, slot].copy_(dev[..., width])
        self.ko_lens[:, slot].copy_(dev[..., width + 1])
        self.ko_positions[:, slot, :, :most].copy_(dev[..., width + 2 :])


@dataclass(frozen=True)
class KeyOnlyWeights:
    """One VECTOR artifact's regression on the device: ``weight [L, Hkv, d + 1, d]`` float32,
    ``derotate [L, Hkv]`` bool, ``inv_freq [d / 2]`` float32 and ``rope_scaling``."""

    weight: torch.Tensor
    derotate: torch.Tensor
    inv_freq: torch.Tensor
    rope_scaling: float

    @classmethod
    def of(cls, artifact: Any, device: torch.device) -> "KeyOnlyWeights":
        return cls(artifact.weight.to(device, torch.float32).contiguous(), artifact.derotate.to(device, torch.bool),
                   artifact.inv_freq.to(device, torch.float32).contiguous(), float(artifact.rope_scaling))

    def segment(self, layer: int, lens: torch.Tensor, positions: torch.Tensor) -> KeyOnlySegment:
        return KeyOnlySegment(lens, positions, self.weight[layer], self.derotate[layer], self.inv_freq,
                              self.rope_scaling)


@dataclass(frozen=True)
class HeadRowSpan:
    """Queries ``lo .. hi - 1`` of a step's :class:`HeadRowTensors`, decoded in one kernel call:
    their key-only tokens' values are rebuilt by ``weights`` (``None``: no row of the span holds
    any), in the layers where ``key_only_layers[l]`` (some row of the span holds one there)."""

    lo: int
    hi: int
    weights: Optional[KeyOnlyWeights]
    key_only_layers: tuple[bool, ...]


@dataclass(frozen=True)
class HeadRowTensors:
    """A step's compacted rows as the two-segment kernel reads them: one kernel row per query.

    Attributes
    ----------
    query_index : ``[Q]`` int64, the query's token in the step's flattened batch.
    pages, lens : ``[L, Q, Hkv, P]`` / ``[L, Q, Hkv]`` int32, each layer's compact region (its
        whole tokens; the pages cover the key-only ones too).
    ko_lens, ko_positions : ``[L, Q, Hkv]`` / ``[L, Q, Hkv, M]`` int32, VECTOR's key-only tokens.
    table : ``[Q, W]`` int32, the request's positional block-table row (the tail's blocks).
    tail_start, seq_lens : ``[Q]`` int32: the tail is ``tail_start .. seq_lens - 1``.
    spans : the kernel calls, in query order (:class:`HeadRowSpan`).
    """

    query_index: torch.Tensor
    pages: torch.Tensor
    lens: torch.Tensor
    ko_lens: torch.Tensor
    ko_positions: torch.Tensor
    table: torch.Tensor
    tail_start: torch.Tensor
    seq_lens: torch.Tensor
    spans: tuple[HeadRowSpan, ...]


def artifact_groups(heads: Sequence[HeadRow]) -> list[tuple[Any, list[int]]]:
    """``(artifact, indices into heads)`` per VECTOR artifact, in order of first use; rows
    without key-only tokens join the first group (``(None, every index)`` when no row has any)."""
    groups: dict[int, tuple[Any, list[int]]] = {}
    plain = []
    for i, head in enumerate(heads):
        ko = head.region.key_only
        if ko is None:
            plain.append(i)
        else:
            groups.setdefault(id(ko.artifact), (ko.artifact, []))[1].append(i)
    ordered = list(groups.values()) or [(None, [])]
    ordered[0] = (ordered[0][0], plain + ordered[0][1])
    return ordered


class HeadRowBuffers:
    """The persistent buffers :class:`HeadRowTensors` are views of, the page pool, and the
    artifacts' regressions on the device."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.pool = PagePool(device)
        self._ints: Optional[torch.Tensor] = None  # [5, Q] int32
        self._flat: dict[str, Optional[torch.Tensor]] = dict.fromkeys(
            ("pages", "lens", "ko_lens", "ko_positions", "table"))
        self._weights: dict[int, tuple[Any, KeyOnlyWeights]] = {}

    def _view(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        numel = 1
        for n in shape:
            numel *= n
        self._flat[name] = grown(self._flat[name], (numel,), torch.int32, self.device)
        return self._flat[name][:numel].view(shape)

    def weights(self, artifact: Any) -> KeyOnlyWeights:
        """``artifact``'s regression on the device (sent once; the artifact is kept with it, so
        its ``id`` is not reused while cached)."""
        entry = self._weights.get(id(artifact))
        if entry is None:
            entry = self._weights[id(artifact)] = (artifact, KeyOnlyWeights.of(artifact, self.device))
        return entry[1]

    def prepare(self, step: EvictionStep, block_table: torch.Tensor, num_kv_heads: int,
                block_size: int) -> Optional[HeadRowTensors]:
        """The step's head rows on the device (``None`` if it has none); ``block_table``: the
        runner's positional ``[rows, W]`` table (before the step's rewrite)."""
        if not step.head_rows:
            return None
        all_rows = list(step.head_rows)
        groups = artifact_groups([step.head_rows[r] for r in all_rows])
        batch_rows = [all_rows[i] for _, members in groups for i in members]
        heads = [step.head_rows[r] for r in batch_rows]
        slots = self.pool.slots(heads, num_kv_heads, block_size)  # one call: every row of the step is live
        columns = []  # (query index, slot, batch row, tail start, length) per query
        for row, head, slot in zip(batch_rows, heads, slots):
            first = head.seq_len - head.num_queries
            columns += [(head.query_offset + i, slot, row, head.region.tail_start, first + i + 1)
                        for i in range(head.num_queries)]
        spans, lo, taken = [], 0, 0
        for artifact, members in groups:
            group = heads[taken : taken + len(members)]
            hi = lo + sum(h.num_queries for h in group)
            spans.append(self._span(lo, hi, artifact, group))
            lo, taken = hi, taken + len(members)
        count = len(columns)
        host = staging((5, count), torch.int32, self.device)
        host.copy_(torch.tensor(columns, dtype=torch.int32).t())
        self._ints = grown(self._ints, (5, count), torch.int32, self.device)
        ints = self._ints[:, :count]
        ints.copy_(host, non_blocking=True)
        pool = self.pool
        slot_index = ints[1].long()
        gathered = {}
        for name, source in (("pages", pool.pages), ("lens", pool.lens), ("ko_lens", pool.ko_lens),
                             ("ko_positions", pool.ko_positions)):
            gathered[name] = self._view(name, (source.shape[0], count, *source.shape[2:]))
            torch.index_select(source, 1, slot_index, out=gathered[name])
        table = self._view("table", (count, block_table.shape[1]))
        torch.index_select(block_table.to(torch.int32), 0, ints[2].long(), out=table)
        return HeadRowTensors(ints[0].long(), gathered["pages"], gathered["lens"], gathered["ko_lens"],
                              gathered["ko_positions"], table, ints[3], ints[4], tuple(spans))

    def _span(self, lo: int, hi: int, artifact: Any, heads: Sequence[HeadRow]) -> HeadRowSpan:
        regions = [h.region.key_only for h in heads if h.region.key_only is not None]
        if artifact is None or not regions:
            return HeadRowSpan(lo, hi, None, ())
        layers = torch.stack([ko.lens.sum(1) > 0 for ko in regions]).any(0)
        return HeadRowSpan(lo, hi, self.weights(artifact), tuple(bool(x) for x in layers))


def decode_head_rows(rows: HeadRowTensors, layer_idx: int, query: torch.Tensor, kv_cache: torch.Tensor,
                     layout: SplitHeadDimLayout, output: torch.Tensor, num_heads: int, scale: float) -> None:
    """Overwrite the output of every head row for this layer: one kernel call per span (``query``,
    ``output``: ``[tokens, H * d]`` or ``[tokens, H, d]``)."""
    d = layout.head_dim
    q = query.view(query.shape[0], num_heads, d).index_select(0, rows.query_index)
    k_cache, v_cache = layout.key_value_views(kv_cache)
    outs = []
    for span in rows.spans:
        part = slice(span.lo, span.hi)
        key_only = None
        if span.weights is not None and span.key_only_layers[layer_idx]:
            key_only = span.weights.segment(layer_idx, rows.ko_lens[layer_idx, part],
                                            rows.ko_positions[layer_idx, part])
        outs.append(paged_decode_attention(q[part], k_cache, v_cache, rows.pages[layer_idx, part],
                                           rows.lens[layer_idx, part], rows.table[part], rows.tail_start[part],
                                           rows.seq_lens[part], scale=scale, key_only=key_only))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    output.view(output.shape[0], num_heads, d).index_copy_(0, rows.query_index, out.to(output.dtype))
