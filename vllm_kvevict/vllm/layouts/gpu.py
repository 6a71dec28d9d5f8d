"""vLLM's GPU cache layout (FlashAttention, Triton; vLLM 0.26 to 0.33).

``[num_blocks, Hkv, block_size, 2 * head_dim]`` logical shape (the memory order may differ: NHD
by default, which the strides express): a slot's key is ``[..., :d]``, its value ``[..., d:]``.
So ``kv_cache[..., :d]`` and ``kv_cache[..., d:]`` are head-major K and V views, the layout the
Triton kernels of :mod:`vllm_kvevict.kernels` take as they are.
"""

from __future__ import annotations

from typing import Optional

import torch

from vllm_kvevict.cache.compact import compact_layer
from vllm_kvevict.cache.copies import PlanCopies
from vllm_kvevict.cache.page_table import CompactionPlan
from vllm_kvevict.vllm.layouts.base import PagedLayout


class SplitHeadDimLayout(PagedLayout):
    """Key and value side by side in each slot's row of ``2 * head_dim`` elements."""

    def key_value_views(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k_cache, v_cache)``, each a ``[num_blocks, Hkv, block_size, d]`` view (no copy)."""
        d = self.head_dim
        return kv_cache[..., :d], kv_cache[..., d:]

    def read(self, kv_cache, block, plane, slot):
        k_cache, v_cache = self.key_value_views(kv_cache)
        return k_cache[block, plane, slot], v_cache[block, plane, slot]

    def write(self, kv_cache, block, plane, slot, keys, values):
        k_cache, v_cache = self.key_value_views(kv_cache)
        k_cache[block, plane, slot] = keys.to(k_cache.dtype)
        v_cache[block, plane, slot] = values.to(v_cache.dtype)

    def compact(self, kv_cache: torch.Tensor, source_blocks: torch.Tensor, plan: CompactionPlan, layer: int,
                copies: Optional[PlanCopies] = None) -> None:
        """The one compaction on the K/V views (Triton on CUDA, its torch reference elsewhere),
        its copy list checked once per request (:meth:`PagedLayout.plan_copies`, computed here
        when not given); key-only tokens, if any, after it (:meth:`PagedLayout.compact_key_only`)."""
        copies = self._copies(kv_cache, source_blocks, plan, copies)
        compact_layer(*self.key_value_views(kv_cache), source_blocks, plan, layer, checked=True)
        self.compact_key_only(kv_cache, source_blocks, plan, layer, copies)
