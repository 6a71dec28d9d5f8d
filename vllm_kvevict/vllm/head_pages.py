"""Head granularity on vLLM's CPU KV cache: compaction into head-pages, and attention over them.

vLLM 0.32's CPU cache of one layer is ``[num_blocks, Hkv, block_size, 2 * head_dim]``: per
(block, KV head) a key page then a value page of ``block_size * head_dim`` elements each, in an
ISA-specific packed order (:func:`vllm_kvevict.vllm.backend.block_layout` probes it). That is the
head-major layout of docs/HEAD_PAGES.md: plane ``g`` of block ``b`` is head-page ``b * Hkv + g``,
only the order of the elements inside a page differs. :class:`PackedPages` maps a (slot, dim)
of a page to its flat offset, so the copy and the reads below are plain torch indexing.

* :func:`compact_layer` copies one layer's kept K/V of one request from its positional blocks
  into its head-pages (``cache.page_table.LayerGather``), reading every source before writing.
* :class:`CompactRegion` is what a compacted request attends: per layer, the (block, plane,
  slot) of each kept entry, grouped by head.
* :func:`attend_compacted` is the torch two-segment attention (each KV head's compact region,
  then the positional tail from the eviction point) for one request's queries: float32, exact,
  the CPU path. The Triton kernel of :mod:`vllm_kvevict.kernels` is the GPU one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvevict.cache.compact import copy_indices
from vllm_kvevict.cache.page_table import CompactionPlan, LayerGather


@dataclass(frozen=True)
class PackedPages:
    """Flat offsets inside one (block, head) page pair: ``key[t, i]`` and ``value[t, i]`` of slot
    ``t``, dim ``i`` (both ``[block_size, head_dim]`` int64; values start after the key page)."""

    key: torch.Tensor
    value: torch.Tensor

    @classmethod
    def from_layout(cls, key_index: torch.Tensor, value_index: torch.Tensor, block_size: int, head_dim: int) -> "PackedPages":
        return cls(
            key=key_index.view(block_size, head_dim),
            value=value_index.view(block_size, head_dim) + block_size * head_dim,
        )


def _flat(kv_cache: torch.Tensor) -> torch.Tensor:
    num_blocks, num_kv_heads, block_size, two_d = kv_cache.shape
    return kv_cache.view(num_blocks, num_kv_heads, block_size * two_d)


def compact_layer(kv_cache: torch.Tensor, pages: PackedPages, source_blocks: torch.Tensor, gather: LayerGather) -> None:
    """Copy kept token ``gather.src_positions[e]`` of head ``gather.head[e]`` into slot
    ``gather.dst_slot[e]`` of head-page ``gather.dst_page[e]``, keys and values, in place.

    ``source_blocks``: the request's positional block ids (position ``p`` is in
    ``source_blocks[p // block_size]``). A destination block must not be a source block.
    """
    if gather.head.numel() == 0:
        return
    num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
    c = copy_indices(gather, source_blocks, num_blocks, num_kv_heads, block_size)
    flat = _flat(kv_cache)
    for offsets in (pages.key, pages.value):
        values = flat[c.src_block[:, None], c.head[:, None], offsets[c.src_slot]]  # [N, d], a copy
        flat[c.dst_block[:, None], c.dst_plane[:, None], offsets[c.dst_slot]] = values


@dataclass
class CompactRegion:
    """Where a compacted request's kept entries live, per layer (all ``[N_l]`` int64 grouped by
    head, ``lens[l]`` entries per head), and where its positional tail starts."""

    block: list[torch.Tensor]
    plane: list[torch.Tensor]
    slot: list[torch.Tensor]
    lens: torch.Tensor  # [L, Hkv]
    #: first position of the tail (the prompt length at eviction).
    tail_start: int
    #: index of the first tail block in the request's positional block list.
    first_tail_block: int

    @classmethod
    def from_plan(cls, plan: CompactionPlan, tail_start: int) -> "CompactRegion":
        block, plane, slot = [], [], []
        for layer in range(plan.num_layers):
            g = plan.layer_gather(layer)
            block.append(g.dst_page // plan.num_kv_heads)
            plane.append(g.dst_page % plan.num_kv_heads)
            slot.append(g.dst_slot)
        return cls(block, plane, slot, plan.lens.clone(), tail_start, tail_start // plan.block_size)


def read_region(kv_cache: torch.Tensor, pages: PackedPages, region: CompactRegion, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keys, values)`` ``[N_l, d]`` of layer ``layer``'s compact region, grouped by head."""
    flat = _flat(kv_cache)
    b, p, s = region.block[layer][:, None], region.plane[layer][:, None], region.slot[layer]
    return flat[b, p, pages.key[s]], flat[b, p, pages.value[s]]


def read_tail(
    kv_cache: torch.Tensor, pages: PackedPages, tail_blocks: torch.Tensor, first_position: int, end: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keys, values)`` ``[T, Hkv, d]`` of positions ``first_position .. end - 1`` of every head.

    ``tail_blocks``: the request's positional block ids from block ``first_position // bs`` on
    (``tail_blocks[0]`` holds position ``(first_position // bs) * bs``).
    """
    num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
    flat = _flat(kv_cache)
    pos = torch.arange(first_position, end)
    idx = pos // block_size - first_position // block_size
    b = tail_blocks.long()[idx][:, None, None]
    h = torch.arange(num_kv_heads)[None, :, None]
    s = pos % block_size
    return flat[b, h, pages.key[s][:, None, :]], flat[b, h, pages.value[s][:, None, :]]


def attend_compacted(
    queries: torch.Tensor,
    query_positions: torch.Tensor,
    region_keys: torch.Tensor,
    region_values: torch.Tensor,
    region_lens: torch.Tensor,
    tail_keys: torch.Tensor,
    tail_values: torch.Tensor,
    tail_positions: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of one request's queries over (each KV head's compact region) + (its tail).

    Parameters
    ----------
    queries : ``[n, H, d]``; query head ``h`` reads KV head ``h // (H // Hkv)``.
    query_positions : ``[n]`` positions of the queries (causality over the tail).
    region_keys, region_values : ``[N, d]`` grouped by head, ``region_lens[g]`` entries for head ``g``
        (all before every query: the compact region is the prompt).
    tail_keys, tail_values : ``[T, Hkv, d]`` at ``tail_positions [T]``.

    Returns
    -------
    ``[n, H, d]`` float32.
    """
    n, num_heads, d = queries.shape
    num_kv_heads = region_lens.numel()
    group = num_heads // num_kv_heads
    # each head's region, padded to the longest one: [Hkv, Lmax, d] and its validity [Hkv, Lmax]
    lens = region_lens.to(torch.int64)
    longest = int(lens.max()) if lens.numel() else 0
    slot = torch.arange(longest)
    valid = slot[None, :] < lens[:, None]
    index = ((torch.cumsum(lens, 0) - lens)[:, None] + slot[None, :]).clamp(max=max(region_keys.shape[0] - 1, 0))
    keys = torch.cat([region_keys.float()[index], tail_keys.float().transpose(0, 1)], dim=1)  # [Hkv, Lmax+T, d]
    values = torch.cat([region_values.float()[index], tail_values.float().transpose(0, 1)], dim=1)
    visible = tail_positions[None, :] <= query_positions[:, None]  # [n, T]
    mask = torch.cat([valid[None].expand(n, -1, -1), visible[:, None, :].expand(-1, num_kv_heads, -1)], dim=2)
    q = queries.float().view(n, num_kv_heads, group, d)
    logits = torch.einsum("nkgd,ktd->nkgt", q, keys) * scale
    logits = logits.masked_fill(~mask[:, :, None, :], float("-inf"))
    out = torch.einsum("nkgt,ktd->nkgd", torch.softmax(logits, dim=-1), values)
    return out.reshape(n, num_heads, d)
