"""Compaction on one layer's head-major paged cache: the checked copy list, the copy, the reader.

Cache layout (head-major, one layer): ``[num_blocks, Hkv, block_size, head_dim]``. Position
``p`` of the request is in block ``block_table[p // bs]``, slot ``p % bs``, plane ``g`` for head
``g``; head-page ``h`` is block ``h // Hkv``, plane ``h % Hkv``.

VECTOR's key-only tokens share slots two by two (:class:`~vllm_kvevict.cache.page_table.KeyOnlyGather`):
:func:`pack_key_pairs` makes the (K half, V half) rows a slot is written with from their keys,
:func:`unpack_key_pairs` gives each entry its key back from the two halves its slot reads.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch

from vllm_kvevict.cache.page_table import CompactionPlan, LayerGather, kept_positions_tensor, page_table_tensor


@dataclass
class CopyIndices:
    """Where each entry of a :class:`LayerGather` is read and written: all ``[N]`` int64."""

    src_block: torch.Tensor
    head: torch.Tensor
    src_slot: torch.Tensor
    dst_block: torch.Tensor
    dst_plane: torch.Tensor
    dst_slot: torch.Tensor

    def take(self, index) -> "CopyIndices":
        """The entries at ``index`` (a slice or a mask) of every field."""
        return CopyIndices(*(getattr(self, f.name)[index] for f in fields(self)))

    @staticmethod
    def empty(device=None) -> "CopyIndices":
        return CopyIndices(*(torch.zeros(0, dtype=torch.int64, device=device) for _ in fields(CopyIndices)))


def copy_indices(
    gather: LayerGather, block_table: torch.Tensor, num_blocks: int, num_kv_heads: int, block_size: int, device=None
) -> CopyIndices:
    """Checked (block, plane, slot) of every copy of ``gather``: sources through the request's
    positional ``block_table``, destinations from head-page ids. Raises ``ValueError`` for a
    kept position past the table, a destination outside the cache, or a destination block that
    is also a source block (the copy would overwrite what it reads)."""
    table = torch.as_tensor(block_table, dtype=torch.int64).to(device)
    return _checked(None, gather, table, num_blocks, num_kv_heads, block_size, device)


def _checked(layer: Optional[torch.Tensor], gather, table: torch.Tensor, num_blocks: int, num_kv_heads: int,
             block_size: int, device) -> CopyIndices:
    """:func:`copy_indices` of the entries of ``gather`` (any object with its four ``[N]``
    fields); with ``layer [N]`` (entries of several layers, each layer its own cache), a
    destination block is refused when it is a source block *of its own layer*."""
    src_pos = gather.src_positions.to(device)
    if int(src_pos.max()) >= table.numel() * block_size:
        raise ValueError(f"kept position {int(src_pos.max())} past the block table ({table.numel()} blocks)")
    src_block = table[src_pos // block_size]
    dst_page = gather.dst_page.to(device)
    dst_block = dst_page // num_kv_heads
    if _shared_block(layer, dst_block, layer, src_block):
        raise ValueError("a compact block is also a source block of this compaction")
    if int(dst_block.max()) >= num_blocks or int(dst_page.min()) < 0:
        raise ValueError(f"head-page out of range for a cache of {num_blocks} blocks")
    return CopyIndices(
        src_block=src_block,
        head=gather.head.to(device),
        src_slot=src_pos % block_size,
        dst_block=dst_block,
        dst_plane=dst_page % num_kv_heads,
        dst_slot=gather.dst_slot.to(device),
    )


def _shared_block(dst_layer: Optional[torch.Tensor], dst_block: torch.Tensor, src_layer: Optional[torch.Tensor],
                  src_block: torch.Tensor) -> bool:
    """Whether a destination block is also a source block (of the same layer, with layers)."""
    if dst_layer is None:
        return bool(torch.isin(dst_block, src_block).any())
    # a [layers, destination span] table of the sources in it: linear, where isin sorts
    low, high = int(dst_block.min()), int(dst_block.max())
    span = high - low + 1
    layers = int(max(int(dst_layer.max()), int(src_layer.max()))) + 1
    seen = torch.zeros(layers * span, dtype=torch.bool, device=dst_block.device)
    inside = (src_block >= low) & (src_block <= high)
    seen[(src_layer.to(src_block.device) * span + src_block - low)[inside]] = True
    return bool(seen[dst_layer.to(dst_block.device) * span + dst_block - low].any())


def pack_key_pairs(keys: torch.Tensor, half: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k_half, v_half)`` ``[M / 2, d]``: the rows of the ``M / 2`` slots ``M`` key-only
    entries are written to, entry ``2i`` in slot ``i``'s K half and ``2i + 1`` in its V half.

    ``keys [M, d]`` the entries' keys, ``half [M]`` their halves (must be ``0, 1, 0, 1, ...``:
    a :class:`~vllm_kvevict.cache.page_table.KeyOnlyGather`'s order).
    """
    if keys.shape[0] % 2 or not torch.equal(half.to(torch.int64).cpu(), torch.arange(keys.shape[0]) % 2):
        raise ValueError(f"{keys.shape[0]} key-only entries are not pairs of (K half, V half)")
    return keys[0::2], keys[1::2]


def unpack_key_pairs(k_half: torch.Tensor, v_half: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """``[M, d]`` each key-only entry's key: the K half (``half == 0``) or V half (``1``) of
    what its slot holds (``k_half``, ``v_half`` ``[M, d]``, the slot's two rows read per entry)."""
    return torch.where(half.to(k_half.device).view(-1, 1) == 0, k_half, v_half)


def compact_layer(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, plan: CompactionPlan, layer: int,
    impl: str = "auto", checked: bool = False,
) -> None:
    """Copy layer ``layer``'s kept K/V into its head-pages, in place: the copy list is checked
    (:func:`copy_indices`), then :func:`vllm_kvevict.kernels.compact` copies (Triton on CUDA,
    its torch reference, the one torch compaction, elsewhere).

    Parameters
    ----------
    k_cache, v_cache : ``[num_blocks, Hkv, bs, d]`` this layer's cache (any strides, head dim
        contiguous: e.g. views of vLLM's GPU cache).
    block_table : ``[num_positional_blocks]`` the request's positional block ids (covering every
        kept position).
    plan : from :func:`vllm_kvevict.cache.page_table.plan_compaction`.
    checked : the caller has checked every layer's copy list already
        (:func:`vllm_kvevict.cache.copies.plan_copies`).
    """
    from vllm_kvevict.kernels import compact

    num_blocks, num_kv_heads, block_size, _ = k_cache.shape
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"K cache {tuple(k_cache.shape)} and V cache {tuple(v_cache.shape)} differ")
    gather = plan.layer_gather(layer)
    if gather.head.numel() == 0:
        return
    if not checked:
        copy_indices(gather, block_table, num_blocks, num_kv_heads, block_size)  # on the host: no device sync
    pages, lens = page_table_tensor(plan)
    positions = kept_positions_tensor(plan)
    table = torch.as_tensor(block_table, dtype=torch.int64).to(k_cache.device)[None]
    compact(k_cache, v_cache, table, positions[layer][None].to(k_cache.device), lens[layer][None].to(k_cache.device),
            pages[layer][None].to(k_cache.device), impl=impl)


def gather_compact(cache: torch.Tensor, pages: torch.Tensor, lens: torch.Tensor) -> list[torch.Tensor]:
    """Read each head's compact region back.

    Parameters
    ----------
    cache : ``[num_blocks, Hkv, bs, d]`` one layer (K or V).
    pages : ``[Hkv, max_pages]`` head-page ids (``-1`` padding), e.g. ``page_table_tensor(plan)[0][l]``.
    lens : ``[Hkv]`` tokens per head.

    Returns
    -------
    per head ``g``: ``[lens[g], d]``, token ``i`` read from page ``pages[g, i // bs]``, slot ``i % bs``.
    """
    num_kv_heads, block_size = cache.shape[1], cache.shape[2]
    out = []
    for g in range(pages.shape[0]):
        i = torch.arange(int(lens[g]), device=cache.device)
        page = pages[g].to(device=cache.device, dtype=torch.int64)[i // block_size]
        if bool((page < 0).any()):
            raise ValueError(f"head {g}: {int(lens[g])} tokens but only {int((pages[g] >= 0).sum())} pages")
        out.append(cache[page // num_kv_heads, page % num_kv_heads, i % block_size])
    return out
