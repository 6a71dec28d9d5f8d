"""vLLM's CPU attention backend (``CPU_ATTN``) with eviction.

* The builder takes the step's :class:`~vllm_kvevict.vllm.step.EvictionStep` from the worker
  (:func:`~vllm_kvevict.vllm.step.step_source`), rewrites the block-table rows and lengths it
  names (:func:`~vllm_kvevict.vllm.block_tables.rewrite`, on a copy of the common metadata),
  runs the stock build on that, and returns the stock metadata with the step attached: every
  request attends through the stock kernel, and requests that evicted nothing see exactly the
  stock metadata.
* The impl runs the stock forward, then reads the step: compacted rows attend their compact
  region + tail (:mod:`.head_rows`; or the GPU path, :mod:`.head_rows_paged`, when
  ``KVEVICT_CPU_HEAD_DECODE=paged`` asks for that check), rows being prefilled are observed and
  scored (:mod:`.observe`).

Registered in place of ``CPU_ATTN`` (the CPU platform ignores ``--attention-backend``) and on
``CUSTOM``, by :mod:`vllm_kvevict.vllm.compat`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from vllm_kvevict.vllm import block_tables
from vllm_kvevict.vllm.backends.decode_observe import observe_decode_rows
from vllm_kvevict.vllm.backends.head_batch import HeadRowBuffers
from vllm_kvevict.vllm.backends.head_rows import attend_head_rows
from vllm_kvevict.vllm.backends.head_rows_paged import attend_head_rows_paged, paged_path_selected
from vllm_kvevict.vllm.backends.observe import observe_rows
from vllm_kvevict.vllm.layouts import CpuPackedLayout
from vllm_kvevict.vllm.model_info import layer_index
from vllm_kvevict.vllm.step import EvictionStep, step_source


@dataclasses.dataclass
class KVEvictCPUMetadata(CPUAttentionMetadata):
    """vLLM's CPU metadata plus this step's eviction plan (``None``: nothing to do)."""

    eviction: Optional[EvictionStep] = None
    layout: Optional[CpuPackedLayout] = None


class KVEvictCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.layout = CpuPackedLayout(kv_cache_spec.num_kv_heads, kv_cache_spec.block_size,
                                      kv_cache_spec.head_size, self.isa, kv_cache_spec.dtype)
        self.steps = step_source()
        if self.steps is not None:
            self.steps.bind_layout(list(layer_names), self.layout)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False) -> CPUAttentionMetadata:
        step = self.steps.current_step() if self.steps is not None and not self.is_encoder_only_attention else None
        if step:
            common_attn_metadata = block_tables.rewrite(common_attn_metadata, step.table_rows)
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        if not step:
            return metadata
        fields = {f.name: getattr(metadata, f.name) for f in dataclasses.fields(CPUAttentionMetadata)}
        return KVEvictCPUMetadata(**fields, eviction=step, layout=self.layout)


class KVEvictCPUImpl(CPUAttentionBackendImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                              output_block_scale)
        step = getattr(attn_metadata, "eviction", None)
        if not step or self.attn_type != AttentionType.DECODER:
            return out
        layer_name = getattr(layer, "layer_name", "")
        idx, layout = layer_index(layer_name), attn_metadata.layout
        if step.head_rows and paged_path_selected():
            if getattr(self, "_paged_rows", None) is None:
                self._paged_rows = HeadRowBuffers(kv_cache.device)
            attend_head_rows_paged(self._paged_rows, step, idx, query, kv_cache, layout, output, self.num_heads,
                                   self.scale)
        elif step.head_rows:
            attend_head_rows(step, idx, query, kv_cache, layout, output, self.num_heads, self.scale)
        if step.observe:
            observe_rows(step, layer_name, idx, query, kv_cache, layout, self.num_heads, self.scale,
                         self.unsupported_for_eviction())
        if step.decode:
            observe_decode_rows(step, layer_name, idx, query, kv_cache, layout, self.num_heads, self.scale,
                                self.unsupported_for_eviction())
        return out

    def unsupported_for_eviction(self) -> str:
        """Why this layer cannot be scored and compacted (empty if it can)."""
        if self.is_fp8_kv_cache:
            return "fp8 KV caches are not supported by eviction"
        if self.alibi_slopes is not None or self.logits_soft_cap or self.sinks is not None:
            return "eviction supports plain causal attention only (no ALiBi, soft-cap, attention sinks)"
        if self.sliding_window not in (None, -1, (-1, -1)):
            return f"eviction does not support sliding window {self.sliding_window}"
        return ""


class KVEvictCPUBackend(CPUAttentionBackend):
    """``CPU_ATTN`` with eviction (same name, so vLLM's CPU-specific checks still apply)."""

    @staticmethod
    def get_impl_cls() -> type[KVEvictCPUImpl]:
        return KVEvictCPUImpl

    @staticmethod
    def get_builder_cls() -> type[KVEvictCPUMetadataBuilder]:
        return KVEvictCPUMetadataBuilder


BACKEND_CLASS_PATH = f"{KVEvictCPUBackend.__module__}.{KVEvictCPUBackend.__qualname__}"
