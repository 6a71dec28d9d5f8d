"""vLLM's FlashAttention backend (``FLASH_ATTN``: FA3 on Hopper, FA2 elsewhere) with eviction.

The stock backend with :class:`~vllm_kvevict.vllm.backends.gpu.EvictingBuilder` and
:class:`~vllm_kvevict.vllm.backends.gpu.EvictingImpl` mixed in: prefill and every row without
compact pages go through vLLM's kernel unchanged (``flash_attn_varlen_func`` over the step's
block table, evicted pages already dropped from it); compacted rows then decode through the
two-segment Triton kernel; prompts completing this step are scored from the paged cache.
Registered on the ``FLASH_ATTN`` slot by :mod:`vllm_kvevict.vllm.compat` (same name, so vLLM's
own checks for ``FLASH_ATTN`` still apply).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadata,
    FlashAttentionMetadataBuilder,
)

from vllm_kvevict.vllm.backends.gpu import EvictingBuilder, EvictingImpl, GpuEviction


@dataclass
class KVEvictFlashAttentionMetadata(FlashAttentionMetadata):
    """vLLM's FlashAttention metadata plus this step's eviction plan (``None``: nothing to do)."""

    eviction: Optional[GpuEviction] = None


class KVEvictFlashAttentionMetadataBuilder(EvictingBuilder, FlashAttentionMetadataBuilder):
    metadata_cls = KVEvictFlashAttentionMetadata


class KVEvictFlashAttentionImpl(EvictingImpl, FlashAttentionImpl):
    pass


class KVEvictFlashAttentionBackend(FlashAttentionBackend):
    """``FLASH_ATTN`` with eviction."""

    @staticmethod
    def get_impl_cls() -> type[KVEvictFlashAttentionImpl]:
        return KVEvictFlashAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[KVEvictFlashAttentionMetadataBuilder]:
        return KVEvictFlashAttentionMetadataBuilder


BACKEND_CLASS_PATH = f"{KVEvictFlashAttentionBackend.__module__}.{KVEvictFlashAttentionBackend.__qualname__}"
