"""Paged KV-cache layouts: one interface (:class:`PagedLayout`), one implementation per cache
layout vLLM uses (:class:`CpuPackedLayout` for vLLM CPU, :class:`SplitHeadDimLayout` for the GPU
backends)."""

from vllm_kvevict.vllm.layouts.base import PagedLayout
from vllm_kvevict.vllm.layouts.cpu import CpuPackedLayout, page_offsets
from vllm_kvevict.vllm.layouts.gpu import SplitHeadDimLayout

__all__ = ["CpuPackedLayout", "PagedLayout", "SplitHeadDimLayout", "page_offsets"]
