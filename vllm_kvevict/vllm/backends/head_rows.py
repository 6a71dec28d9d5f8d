"""What the attention impl does for compacted (head-granular) rows: attend compact region + tail.

The stock kernel attended such a row over its positional tail only (the builder gave it that
table); this replaces the row's output by attention over each KV head's compact region, then
the tail (causal), through the one torch two-segment reference
(:func:`vllm_kvevict.kernels.masked_attention`). On a GPU the Triton two-segment kernel does the
same from the same data.

VECTOR's key-only tokens (``region.key_only``): each slot of a key-only pair holds two keys, one
in its K half and one in its V half (:meth:`PagedLayout.read_key_only`); each one's value is
rebuilt from its key at its position by the reference engine's own function
(:func:`vllm_kvevict.reference.key_only.entry_values`), and the token joins its head's region.
On vLLM-CPU this path reads key-only tokens (vLLM's op on single-head pages does not); the
GPU path (:mod:`.head_batch`, also run inside vLLM-CPU under ``KVEVICT_CPU_HEAD_DECODE=paged``)
rebuilds them in the Triton kernel (:mod:`vllm_kvevict.kernels.key_only_decode`).
"""

from __future__ import annotations

import logging
from typing import Iterable, Optional

import torch

from vllm_kvevict.kernels import masked_attention
from vllm_kvevict.reference.key_only import entry_values
from vllm_kvevict.vllm.layouts import PagedLayout
from vllm_kvevict.vllm.step import CompactRegion, EvictionStep, HeadRow

logger = logging.getLogger(__name__)


def attend_head_rows(step: EvictionStep, layer_idx: int, query: torch.Tensor, kv_cache: torch.Tensor,
                     layout: PagedLayout, output: torch.Tensor, num_heads: int, scale: float,
                     rows: Optional[Iterable[HeadRow]] = None) -> list[str]:
    """Overwrite the output of every head row of ``step`` (or of ``rows``) for this layer; returns
    the request ids whose attention failed (logged; their output stays the stock kernel's)."""
    failed = []
    d = layout.head_dim
    q_all = query.view(query.shape[0], num_heads, d)
    out_all = output.view(output.shape[0], num_heads, d)
    for row in step.head_rows.values() if rows is None else rows:
        try:
            out = attend_row(row, layer_idx, q_all, kv_cache, layout, scale)
            out_all[row.query_offset : row.query_offset + row.num_queries] = out.to(output.dtype)
        except Exception as exc:  # never into the engine core
            logger.error("kvevict: head-granular attention failed for %s: %s", row.req_id, exc)
            logger.debug("kvevict: head-granular failure", exc_info=exc)
            failed.append(row.req_id)
    return failed


def attend_row(row: HeadRow, layer_idx: int, queries: torch.Tensor, kv_cache: torch.Tensor, layout: PagedLayout,
               scale: float) -> torch.Tensor:
    """``[n, H, d]`` float32 attention of one compacted row's queries (``queries [tokens, H, d]``)."""
    region = row.region
    q = queries[row.query_offset : row.query_offset + row.num_queries]
    region_k, region_v, lens = read_region_entries(region, layer_idx, kv_cache, layout)
    tail_k, tail_v = layout.read_tail(kv_cache, row.tail_blocks, region.tail_start, row.seq_len)
    query_positions = torch.arange(row.seq_len - row.num_queries, row.seq_len)
    return attend_compacted(q, query_positions, region_k, region_v, lens, tail_k, tail_v,
                            torch.arange(region.tail_start, row.seq_len), scale)


def read_region_entries(region: CompactRegion, layer_idx: int, kv_cache: torch.Tensor,
                        layout: PagedLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(keys [N, d], values [N, d], lens [Hkv])`` of layer ``layer_idx``'s region grouped by head:
    each head's whole tokens, then its key-only tokens with their values rebuilt (in the cache's
    dtype, as the reference engine stores them)."""
    keys, values = layout.read_region(kv_cache, region.block[layer_idx], region.plane[layer_idx],
                                      region.slot[layer_idx])
    lens, ko = region.lens[layer_idx], region.key_only
    if ko is None or int(ko.lens[layer_idx].sum()) == 0:
        return keys, values, lens
    ko_keys = layout.read_key_only(kv_cache, ko.block[layer_idx], ko.plane[layer_idx], ko.slot[layer_idx],
                                   ko.half[layer_idx])
    heads = ko.heads(layer_idx)
    ko_values = entry_values(ko.artifact, layer_idx, ko_keys, heads, ko.positions[layer_idx])
    whole_heads = torch.repeat_interleave(torch.arange(lens.numel()), lens)
    order = torch.sort(torch.cat([whole_heads, heads]), stable=True).indices
    merged_keys = torch.cat([keys, ko_keys.to(keys.dtype)])[order]
    merged_values = torch.cat([values, ko_values.to(values.dtype)])[order]
    return merged_keys, merged_values, lens + ko.lens[layer_idx]


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
    region_keys, region_values : ``[N, d]`` grouped by head, ``region_lens[g]`` entries for head
        ``g`` (all before every query: the compact region is the prompt).
    tail_keys, tail_values : ``[T, Hkv, d]`` at ``tail_positions [T]``.

    Returns
    -------
    ``[n, H, d]`` float32.
    """
    n, num_heads, d = queries.shape
    num_kv_heads = region_lens.numel()
    # each head's region, padded to the longest one: [Hkv, Lmax, d] and its validity [Hkv, Lmax]
    lens = region_lens.to(torch.int64)
    longest = int(lens.max()) if lens.numel() else 0
    slot = torch.arange(longest)
    in_region = slot[None, :] < lens[:, None]
    index = ((torch.cumsum(lens, 0) - lens)[:, None] + slot[None, :]).clamp(max=max(region_keys.shape[0] - 1, 0))
    keys = torch.cat([region_keys[index], tail_keys.transpose(0, 1)], dim=1)  # [Hkv, Lmax+T, d]
    values = torch.cat([region_values[index], tail_values.transpose(0, 1)], dim=1)
    visible = tail_positions[None, :] <= query_positions[:, None]  # [n, T]
    valid = torch.cat([in_region[None].expand(n, -1, -1), visible[:, None, :].expand(-1, num_kv_heads, -1)], dim=2)
    q = queries.view(1, n, num_kv_heads, num_heads // num_kv_heads, d)
    out = masked_attention(q, keys[None], values[None], valid[None], scale)
    return out.reshape(n, num_heads, d)
