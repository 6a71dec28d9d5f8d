"""vLLM's Triton attention backend (``TRITON_ATTN``) with eviction.

The stock backend with :class:`~vllm_kvevict.vllm.backends.gpu.EvictingBuilder` and
:class:`~vllm_kvevict.vllm.backends.gpu.EvictingImpl` mixed in: prefill and every row without
compact pages go through vLLM's ``unified_attention`` unchanged (over the step's block table,
evicted pages already dropped from it); compacted rows then decode through the two-segment
Triton kernel; prompts completing this step are scored from the paged cache. Registered on the
``TRITON_ATTN`` slot by :mod:`vllm_kvevict.vllm.compat` (same name, so vLLM's own checks for
``TRITON_ATTN`` still apply).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadata,
    TritonAttentionMetadataBuilder,
)

from vllm_kvevict.vllm.backends.gpu import EvictingBuilder, EvictingImpl, GpuEviction


@dataclass
class KVEvictTritonAttentionMetadata(TritonAttentionMetadata):
    """vLLM's Triton attention metadata plus this step's eviction plan (``None``: nothing to do)."""

    eviction: Optional[GpuEviction] = None


class KVEvictTritonAttentionMetadataBuilder(EvictingBuilder, TritonAttentionMetadataBuilder):
    metadata_cls = KVEvictTritonAttentionMetadata


class KVEvictTritonAttentionImpl(EvictingImpl, TritonAttentionImpl):
    pass


class KVEvictTritonAttentionBackend(TritonAttentionBackend):
    """``TRITON_ATTN`` with eviction."""

    @staticmethod
    def get_impl_cls() -> type[KVEvictTritonAttentionImpl]:
        return KVEvictTritonAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[KVEvictTritonAttentionMetadataBuilder]:
        return KVEvictTritonAttentionMetadataBuilder


BACKEND_CLASS_PATH = f"{KVEvictTritonAttentionBackend.__module__}.{KVEvictTritonAttentionBackend.__qualname__}"
