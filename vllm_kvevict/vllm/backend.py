"""Our attention backend: vLLM's CPU backend plus eviction scoring and compacted block tables.

* The metadata builder rewrites, on a copy of ``CommonAttentionMetadata``, the block-table rows
  and sequence lengths of requests that evicted pages (:func:`worker.compact_block_table`),
  then calls the stock ``build``: the stock kernel serves every request, and requests that
  evicted nothing see exactly the stock metadata. Slot mappings (cache writes) were computed
  from the real, positional block table before the builder runs, so writes stay positional.
* The impl runs the stock forward, then, for rows the worker state flagged this step, stashes
  window queries and, in the request's last prefill chunk, scores this layer's tokens against
  all the request's cached keys (gathered through its block table).

Registered on ``AttentionBackendEnum.CUSTOM`` and, on CPU, in place of ``CPU_ATTN`` (the CPU
platform ignores ``--attention-backend``); see :mod:`vllm_kvevict.vllm.eviction_hooks`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time

import torch

from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from vllm_kvevict.policies.base import LayerInputs
from vllm_kvevict.vllm.worker import (
    _score_layer,
    compact_block_table,
    get_worker_state,
    needs_attention_sum,
    needs_query_stats,
)

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def block_layout(isa: str, block_size: int, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the CPU kernel puts token ``t``, dim ``i`` of one (block, head) page, for K and V.

    The CPU attention kernels store a page in an ISA-specific packed layout (``vec`` keeps
    keys transposed, ``[d, block]``; others may pack differently), so the layout is probed once
    with vLLM's own cache-write op: a key whose element ``(t, i)`` encodes ``t`` (then ``i``)
    is written and read back.

    Returns
    -------
    ``(key_index, value_index)``, each ``[block_size * head_dim]`` int64: flat page offsets of
    ``(t, i)`` in row-major ``[block_size, head_dim]`` order.
    """
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
        return out

    return index(k_tok, k_dim), index(v_tok, v_dim)


@functools.lru_cache(maxsize=None)
def packed_pages(isa: str, block_size: int, head_dim: int, dtype: torch.dtype):
    """:func:`block_layout` as the :class:`~vllm_kvevict.vllm.head_pages.PackedPages` the
    head-page copy and reads index with (one object per layout, shared by every layer)."""
    from vllm_kvevict.vllm.head_pages import PackedPages

    return PackedPages.from_layout(*block_layout(isa, block_size, head_dim, dtype), block_size, head_dim)


def layer_index(layer_name: str) -> int:
    """``model.layers.7.self_attn.attn`` -> 7 (the first integer component)."""
    for part in layer_name.split("."):
        if part.isdigit():
            return int(part)
    return 0


def stash_compaction_sources(state, block_table: torch.Tensor, block_size: int) -> None:
    """Head granularity: remember the positional block ids of rows scored this step (the
    compaction's sources, after the forward) before any block-table rewrite."""
    for row, plan in state.rows.items():
        req = state.requests.get(plan.req_id)
        if plan.score and req is not None and req.config.resolved_granularity == "head" and row < block_table.shape[0]:
            num_blocks = -(-req.prompt_len // block_size)
            req.source_blocks = block_table[row, :num_blocks].to("cpu", torch.int64).clone()


class KVEvictCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        get_worker_state().block_size = kv_cache_spec.block_size

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> CPUAttentionMetadata:
        state = get_worker_state()
        if state.step_open and state.rows:
            stash_compaction_sources(state, common_attn_metadata.block_table_tensor, self.block_size)
        rows = state.compact_rows
        if rows and state.step_open and not state.compacted_by_runner and not self.is_encoder_only_attention:
            cm = common_attn_metadata
            table, lens = compact_block_table(cm.block_table_tensor, cm.seq_lens, rows, self.block_size)
            common_attn_metadata = dataclasses.replace(
                cm,
                block_table_tensor=table,
                seq_lens=lens,
                max_seq_len=int(lens[: cm.num_reqs].max()) if cm.num_reqs else cm.max_seq_len,
            )
        return super().build(common_prefix_len, common_attn_metadata, fast_build)


class KVEvictCPUImpl(CPUAttentionBackendImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None, output_block_scale=None):
        out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale)
        state = get_worker_state()
        if attn_metadata is None or not state.step_open or self.attn_type != AttentionType.DECODER:
            return out
        layer_name = getattr(layer, "layer_name", "")
        if state.compact_orders:  # a compaction after this step's forward copies from here
            state.kv_caches[layer_index(layer_name)] = (kv_cache, layer.isa)
        for row, head_row in list(state.head_rows.items()):
            try:
                self._attend_head_row(layer, layer_name, row, head_row, query, kv_cache, attn_metadata, output)
            except Exception as exc:  # never into the engine core
                state.fail_head_row(row, exc)
        for row, plan in list(state.rows.items()):
            started = time.perf_counter()
            try:
                self._observe_row(state, layer, layer_name, row, plan, query, kv_cache, attn_metadata)
            except Exception as exc:  # never into the engine core
                state.fail(row, exc)
                state.rows.pop(row, None)
            state.add_seconds(row, time.perf_counter() - started)
        return out

    def _attend_head_row(self, layer, layer_name, row, head_row, query, kv_cache, md: CPUAttentionMetadata, output) -> None:
        """Head granularity: replace the row's output (the stock kernel's, over the tail only)
        by attention over its compact region + positional tail."""
        from vllm_kvevict.vllm.head_pages import attend_compacted, read_region, read_tail

        region = head_row.head.region
        idx = layer_index(layer_name)
        num_blocks, num_kv_heads, block_size, _ = kv_cache.size()
        head_dim = self.head_size
        pages = packed_pages(layer.isa, block_size, head_dim, kv_cache.dtype)
        # the builder gave this row the tail only: blocks from P // bs, seq_len - (P // bs) * bs
        seq_len = int(md.seq_lens[row]) + region.first_tail_block * block_size
        tail_blocks = md.block_table[row]
        q0, q1 = int(md.query_start_loc[row]), int(md.query_start_loc[row + 1])
        n = q1 - q0
        region_k, region_v = read_region(kv_cache, pages, region, idx)
        tail_k, tail_v = read_tail(kv_cache, pages, tail_blocks, region.tail_start, seq_len)
        q = query.view(query.shape[0], self.num_heads, head_dim)[q0:q1]
        out = attend_compacted(
            q,
            torch.arange(seq_len - n, seq_len),
            region_k,
            region_v,
            region.lens[idx],
            tail_k,
            tail_v,
            torch.arange(region.tail_start, seq_len),
            self.scale,
        )
        output.view(output.shape[0], self.num_heads, head_dim)[q0:q1] = out.to(output.dtype)

    def _head_unsupported(self) -> str:
        """Why this layer cannot attend head-pages (empty if it can)."""
        if self.is_fp8_kv_cache or self.alibi_slopes is not None or self.logits_soft_cap or self.sinks is not None:
            return "head granularity supports plain causal attention only (no fp8, ALiBi, soft-cap, sinks)"
        if self.sliding_window not in (None, -1, (-1, -1)):
            return f"head granularity does not support sliding window {self.sliding_window}"
        return ""

    def _observe_row(self, state, layer, layer_name, row, plan, query, kv_cache, md: CPUAttentionMetadata) -> None:
        if self.is_fp8_kv_cache:
            raise RuntimeError("fp8 KV cache is not supported by the eviction scorer")
        if plan.score and state.requests[plan.req_id].config.resolved_granularity == "head":
            unsupported = self._head_unsupported()
            if unsupported:
                raise RuntimeError(unsupported)  # scored nowhere: the request stays whole
        q0 = int(md.query_start_loc[row])
        q = query.view(query.shape[0], self.num_heads, self.head_size)
        if plan.window_hi > plan.window_lo:
            state.record_window(layer_name, row, q[q0 + plan.window_lo : q0 + plan.window_hi])
        req = state.requests[plan.req_id]
        collected = q[q0 + plan.collect_lo : q0 + plan.collect_hi]
        if plan.collect_hi > plan.collect_lo and needs_query_stats(req.config):
            state.record_query_stats(layer_name, row, collected)
        if not (plan.score or (plan.collect_hi > plan.collect_lo and needs_attention_sum(req.config))):
            return
        num_blocks, num_kv_heads, block_size, _ = kv_cache.size()
        key_cache, value_cache = kv_cache.view(num_blocks, num_kv_heads, block_size * 2, -1).chunk(2, dim=2)
        # keys this step can see: the prompt (scoring) or up to the chunk's end (attention sums)
        length = req.prompt_len if plan.score else plan.start + plan.collect_hi
        ids = md.block_table[row, : -(-length // block_size)].long()
        head_dim = key_cache.shape[-1]
        key_index, value_index = block_layout(layer.isa, block_size, head_dim, key_cache.dtype)

        def gather(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # -> [Hkv, L, d]
            pages = cache[ids].reshape(len(ids), num_kv_heads, -1)[:, :, index]  # [n, Hkv, bs*d]
            pages = pages.view(len(ids), num_kv_heads, block_size, head_dim).transpose(0, 1)
            return pages.reshape(num_kv_heads, -1, head_dim)[:, :length].float()

        keys = gather(key_cache, key_index)
        if plan.collect_hi > plan.collect_lo and needs_attention_sum(req.config):
            state.record_attention(layer_name, row, collected, keys, self.scale)
        if not plan.score:
            return
        idx = layer_index(layer_name)
        inputs = LayerInputs(
            keys=keys,
            values=gather(value_cache, value_index),
            queries=state.window_of(layer_name, row),
            positions=torch.arange(length),
            o_proj=state.o_proj_of(layer_name),
            layer_idx=idx,
            num_layers=state.num_layers,
            scale=self.scale,
            **state.query_inputs(layer_name, row),
        )
        scores = _score_layer(inputs, req.config, block_size)
        if scores.shape != (num_kv_heads, length):
            raise RuntimeError(f"scorer returned {tuple(scores.shape)}, expected {(num_kv_heads, length)}")
        state.record_scores(row, idx, scores.float())


class KVEvictCPUBackend(CPUAttentionBackend):
    """``CPU_ATTN`` with eviction (same name, so vLLM's CPU-specific checks still apply)."""

    @staticmethod
    def get_impl_cls() -> type[KVEvictCPUImpl]:
        return KVEvictCPUImpl

    @staticmethod
    def get_builder_cls() -> type[KVEvictCPUMetadataBuilder]:
        return KVEvictCPUMetadataBuilder


BACKEND_CLASS_PATH = f"{KVEvictCPUBackend.__module__}.{KVEvictCPUBackend.__qualname__}"
