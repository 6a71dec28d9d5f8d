"""vLLM's CPU cache layout: each (block, KV head) page packed in an ISA-specific order.

vLLM 0.32's CPU attention stores a page as ``block_size * head_dim`` key elements then as many
value elements, in an order of the ISA's choosing (``vec`` keeps keys transposed, ``[d, block]``;
others pack differently). The order is probed once per (ISA, block size, head dim, dtype) with
vLLM's own cache-write op: a key whose element ``(t, i)`` encodes ``t`` (then ``i``) is written
and read back. Entries are then plain indexing at those offsets.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from vllm_kvevict.vllm.layouts.base import PagedLayout


@functools.lru_cache(maxsize=None)
def page_offsets(isa: str, block_size: int, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(key, value)`` ``[block_size, head_dim]`` int64: flat offset, inside one page pair of
    ``2 * block_size * head_dim`` elements, of slot ``t``'s dim ``i`` (values after the keys)."""
    from vllm import _custom_ops as ops

    def probe(encode_token: bool) -> tuple[torch.Tensor, torch.Tensor]:
        page = torch.zeros(1, 1, block_size, 2 * head_dim, dtype=dtype)
        key_cache, value_cache = page.view(1, 1, block_size * 2, head_dim).chunk(2, dim=2)
        t = torch.arange(block_size).view(-1, 1).expand(block_size, head_dim)
        i = torch.arange(head_dim).view(1, -1).expand(block_size, head_dim)
        data = ((t if encode_token else i) + 1).to(dtype).view(block_size, 1, head_dim)
        ops.cpu_attn_reshape_and_cache(
            data, data, key_cache, value_cache, torch.arange(block_size), isa,
            k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto",
        )
        return key_cache[0, 0].reshape(-1).long() - 1, value_cache[0, 0].reshape(-1).long() - 1

    (k_tok, v_tok), (k_dim, v_dim) = probe(True), probe(False)

    def index(tok: torch.Tensor, dim: torch.Tensor) -> torch.Tensor:
        out = torch.full((block_size * head_dim,), -1, dtype=torch.long)
        out[tok * head_dim + dim] = torch.arange(block_size * head_dim)
        if (out < 0).any():
            raise RuntimeError(f"could not infer the {isa} KV page layout")
        return out.view(block_size, head_dim)

    return index(k_tok, k_dim), index(v_tok, v_dim) + block_size * head_dim


def affine_strides(offsets: torch.Tensor) -> Optional[tuple[int, int, int]]:
    """``(first, slot stride, dim stride)`` when ``offsets [block_size, head_dim]`` is an affine
    function of (slot, dim), as ``vec``'s transposed keys and row-major values are; else ``None``."""
    first = int(offsets[0, 0])
    slot = int(offsets[1, 0]) - first if offsets.shape[0] > 1 else 0
    dim = int(offsets[0, 1]) - first if offsets.shape[1] > 1 else 0
    t = torch.arange(offsets.shape[0]).view(-1, 1)
    i = torch.arange(offsets.shape[1]).view(1, -1)
    return (first, slot, dim) if torch.equal(offsets, first + t * slot + i * dim) else None


class CpuPackedLayout(PagedLayout):
    """vLLM CPU's packed pages (offsets from :func:`page_offsets`).

    When the ISA's page order is affine in (slot, dim) (``vec``, ``vec16``: keys ``[d, bs]``,
    values ``[bs, d]``), :meth:`gather` reads whole pages and views them in place of indexing
    every element (issue 14: the per-element gather was the largest scoring cost after ``V @ Wo``).
    A page (block, plane) is ``2 * block_size * head_dim`` contiguous elements: :meth:`read_pages`
    and :meth:`write_pages` (a compaction's whole pages) are one ``index_select`` / ``index_copy_``.
    """

    def __init__(self, num_kv_heads: int, block_size: int, head_dim: int, isa: str, dtype: torch.dtype) -> None:
        super().__init__(num_kv_heads, block_size, head_dim)
        self.isa = isa
        self.key_offsets, self.value_offsets = page_offsets(isa, block_size, head_dim, dtype)
        key, value = affine_strides(self.key_offsets), affine_strides(self.value_offsets)
        self.page_strides = (key, value) if key is not None and value is not None else None

    def gather(self, kv_cache: torch.Tensor, block_ids: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.page_strides is None:
            return super().gather(kv_cache, block_ids, length)
        bs = self.block_size
        blocks = block_ids.to(kv_cache.device, torch.int64)[: -(-length // bs)]
        pages = self._flat(kv_cache).index_select(0, blocks)  # [n, Hkv, bs * 2d]: whole pages, one copy
        n, hkv, size = pages.shape
        out = []
        for first, slot, dim in self.page_strides:
            view = pages.as_strided((hkv, n, bs, self.head_dim), (size, hkv * size, slot, dim),
                                    pages.storage_offset() + first)
            out.append(view.reshape(hkv, n * bs, self.head_dim)[:, :length])
        return out[0], out[1]

    @staticmethod
    def _flat(kv_cache: torch.Tensor) -> torch.Tensor:
        num_blocks, num_kv_heads, block_size, two_d = kv_cache.shape
        return kv_cache.view(num_blocks, num_kv_heads, block_size * two_d)

    def read_pages(self, kv_cache, block, plane):
        pages = kv_cache.view(-1, self.block_size, kv_cache.shape[-1])  # [num_blocks * Hkv, ...]: pages in order
        return pages.index_select(0, block * self.num_kv_heads + plane)

    def write_pages(self, kv_cache, block, plane, pages):
        kv_cache.view(-1, self.block_size, kv_cache.shape[-1]).index_copy_(0, block * self.num_kv_heads + plane, pages)

    def read(self, kv_cache, block, plane, slot):
        flat = self._flat(kv_cache)
        b, p = block[..., None], plane[..., None]
        return flat[b, p, self.key_offsets[slot]], flat[b, p, self.value_offsets[slot]]

    def write(self, kv_cache, block, plane, slot, keys, values):
        flat = self._flat(kv_cache)
        b, p = block[..., None], plane[..., None]
        flat[b, p, self.key_offsets[slot]] = keys.to(flat.dtype)
        flat[b, p, self.value_offsets[slot]] = values.to(flat.dtype)
