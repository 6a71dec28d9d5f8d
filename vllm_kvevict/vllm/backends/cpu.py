"""vLLM's CPU attention backend (``CPU_ATTN``) with eviction.

* The builder takes the step's :class:`~vllm_kvevict.vllm.step.EvictionStep` from the worker
  (:func:`~vllm_kvevict.vllm.step.step_source`), rewrites the block-table rows and lengths it
  names (:func:`~vllm_kvevict.vllm.block_tables.rewrite`, on a copy of the common metadata),
  runs the stock build on that, and returns the stock metadata with the step attached: every
  request attends through the stock kernel, and requests that evicted nothing see exactly the
  stock metadata.
* Compacted rows whose regions are whole pages attend through vLLM's own op on the cache viewed
  as single-head pages (:mod:`.cpu_head_pages`: the builder prepares their tables and the op's
  metadata once per step, and shortens their stock rows to their last block, whose output is
  replaced); the other compacted rows through the torch two-segment path (:mod:`.head_rows`);
  ``KVEVICT_CPU_HEAD_DECODE=torch`` sends every one there, ``=paged`` every one through the GPU
  path (:mod:`.head_rows_paged`, a check; VECTOR's key-only pairs included, their values rebuilt
  in the kernel). Without the switch, rows holding key-only pairs take the torch path (vLLM's op
  does not rebuild their values).
* The impl runs the stock forward, then reads the step: compacted rows attend their compact
  region + tail as above, rows being prefilled are observed and scored (:mod:`.observe`).

Registered in place of ``CPU_ATTN`` (the CPU platform ignores ``--attention-backend``) and on
``CUSTOM``, by :mod:`vllm_kvevict.vllm.compat`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

from vllm import _custom_ops as ops
from vllm import envs
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from vllm_kvevict.vllm import block_tables
from vllm_kvevict.vllm.backends import cpu_head_pages
from vllm_kvevict.vllm.backends.decode_observe import observe_decode_rows
from vllm_kvevict.vllm.backends.head_batch import HeadRowBuffers
from vllm_kvevict.vllm.backends.head_rows import attend_head_rows
from vllm_kvevict.vllm.backends.head_rows_paged import attend_head_rows_paged, head_decode_mode
from vllm_kvevict.vllm.backends.observe import observe_rows
from vllm_kvevict.vllm.layouts import CpuPackedLayout
from vllm_kvevict.vllm.model_info import layer_index
from vllm_kvevict.vllm.step import EvictionStep, step_source

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class KVEvictCPUMetadata(CPUAttentionMetadata):
    """vLLM's CPU metadata plus this step's eviction plan (``None``: nothing to do)."""

    eviction: Optional[EvictionStep] = None
    layout: Optional[CpuPackedLayout] = None
    #: the compacted rows vLLM's op attends on single-head pages (``None``: none this step).
    head_pages: Optional[cpu_head_pages.HeadPageBatch] = None


class KVEvictCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.layout = CpuPackedLayout(kv_cache_spec.num_kv_heads, kv_cache_spec.block_size,
                                      kv_cache_spec.head_size, self.isa, kv_cache_spec.dtype)
        self.region_pages = cpu_head_pages.RegionPagesCache(kv_cache_spec.num_kv_heads, kv_cache_spec.block_size)
        self.steps = step_source()
        if self.steps is not None:
            self.steps.bind_layout(list(layer_names), self.layout)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False) -> CPUAttentionMetadata:
        step = self.steps.current_step() if self.steps is not None and not self.is_encoder_only_attention else None
        pages = None
        if step:
            table_rows = step.table_rows
            if step.head_rows and head_decode_mode() == "":
                pages = self._head_pages(step)
            if pages is not None:
                short = {r: cpu_head_pages.short_tail_row(step.head_rows[r], self.block_size) for r in pages.batch_rows}
                table_rows = {**table_rows, **short}
            common_attn_metadata = block_tables.rewrite(common_attn_metadata, table_rows)
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        if not step:
            return metadata
        fields = {f.name: getattr(metadata, f.name) for f in dataclasses.fields(CPUAttentionMetadata)}
        return KVEvictCPUMetadata(**fields, eviction=step, layout=self.layout, head_pages=pages)

    def _head_pages(self, step: EvictionStep) -> Optional[cpu_head_pages.HeadPageBatch]:
        """The step's whole-page rows for vLLM's op (``None``: every row takes the torch path)."""
        group = self.num_heads // self.num_kv_heads

        def scheduler_metadata(seq_lens, query_start_loc):
            return ops.cpu_attn_get_scheduler_metadata(
                num_reqs=seq_lens.numel(), num_heads=group, num_kv_heads=1, head_dim=self.head_dim,
                seq_lens=seq_lens, dtype=self.dtype, query_start_loc=query_start_loc, causal=True,
                sliding_window_size=-1, isa=self.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
                kv_cache_dtype=self.kv_cache_dtype)

        try:
            return cpu_head_pages.prepare(step.head_rows, self.region_pages, scheduler_metadata)
        except Exception as exc:  # never into the engine core: the torch path attends them
            logger.error("kvevict: head-page tables failed (%s); compacted rows take the torch path", exc)
            return None


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
        if step.head_rows and head_decode_mode() == "paged":
            if getattr(self, "_paged_rows", None) is None:
                self._paged_rows = HeadRowBuffers(kv_cache.device)
            attend_head_rows_paged(self._paged_rows, step, idx, query, kv_cache, layout, output, self.num_heads,
                                   self.scale)
        elif step.head_rows:
            rows = self._attend_head_pages(attn_metadata.head_pages, step, idx, query, kv_cache, output)
            if rows:
                attend_head_rows(step, idx, query, kv_cache, layout, output, self.num_heads, self.scale, rows)
        if step.observe:
            observe_rows(step, layer_name, idx, query, kv_cache, layout, self.num_heads, self.scale,
                         self.unsupported_for_eviction())
        if step.decode:
            observe_decode_rows(step, layer_name, idx, query, kv_cache, layout, self.num_heads, self.scale,
                                self.unsupported_for_eviction())
        return out

    def _attend_head_pages(self, pages, step: EvictionStep, idx: int, query, kv_cache, output) -> list:
        """Attend the rows of ``pages`` through vLLM's op; returns the head rows left to the torch
        path (all of them if the op failed)."""
        if pages is None:
            return list(step.head_rows.values())
        try:
            cpu_head_pages.attend_head_pages(pages, idx, query, kv_cache, output, self.num_heads, self.scale,
                                             ops.cpu_attention_with_kv_cache)
        except Exception as exc:  # never into the engine core
            logger.error("kvevict: head-page attention failed (%s); its rows take the torch path", exc)
            return list(step.head_rows.values())
        return [row for r, row in step.head_rows.items() if r not in pages.batch_rows]

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
