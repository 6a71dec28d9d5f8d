"""What our FlashAttention and Triton backends add to vLLM's, shared by both.

* :class:`EvictingBuilder` (mixed in before vLLM's metadata builder): when the step has an
  :class:`~vllm_kvevict.vllm.step.EvictionStep`, the stock build runs on a copy of the common
  metadata whose block table and lengths hold the step's rows, in this builder's persistent
  buffers (:class:`~vllm_kvevict.vllm.backends.gpu_tables.StepTables`: FlashAttention's AOT
  scheduler metadata, Triton's kernel choice and ``max_seq_len`` are computed from the
  rewritten rows), and the stock metadata comes back as our subclass with a
  :class:`GpuEviction` attached: the head rows' device tensors
  (:class:`~vllm_kvevict.vllm.backends.head_batch.HeadRowBuffers`) and the scoring rows' block
  tables (:class:`~vllm_kvevict.vllm.backends.gpu_observe.ScoringStep`). Without a step (no
  eviction configured, or nothing to do this step) it is the stock build, unchanged.
* :class:`EvictingImpl` (mixed in before vLLM's impl): the stock forward, then, for a decoder
  layer with a :class:`GpuEviction`, the head rows' two-segment decode (one kernel per layer)
  and the observation / scoring of rows being prefilled.

CUDA graphs: with eviction configured the builder declares ``AttentionCGSupport.NEVER``, so
vLLM runs attention outside the graphs: its default ``FULL_AND_PIECEWISE`` becomes
``PIECEWISE`` (vLLM logs the change; our startup refuses an explicit ``FULL``). A full decode
graph would replay the captured attention without the per-step Python above (docs/GPU.md says
what it would take). Cascade attention (vLLM 0.26's FlashAttention) is off with eviction: its
common prefix is found on positional block lists that the step's rows no longer are.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from vllm.v1.attention.backend import AttentionCGSupport, AttentionType

from vllm_kvevict.vllm.backends.decode_observe import observe_decode_rows
from vllm_kvevict.vllm.backends.gpu_observe import ScoringStep, observe_rows_gpu
from vllm_kvevict.vllm.backends.gpu_tables import StepTables
from vllm_kvevict.vllm.backends.head_batch import HeadRowBuffers, HeadRowTensors, decode_head_rows
from vllm_kvevict.vllm.layouts import SplitHeadDimLayout
from vllm_kvevict.vllm.model_info import layer_index
from vllm_kvevict.vllm.startup import wants_eviction
from vllm_kvevict.vllm.step import EvictionStep, step_source

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuEviction:
    """The step's eviction plan as the GPU impls read it, attached to the stock metadata."""

    step: EvictionStep
    layout: SplitHeadDimLayout
    head_rows: Optional[HeadRowTensors]
    scoring: Optional[ScoringStep]


class EvictingBuilder:
    """Mixin for a vLLM ``AttentionMetadataBuilder`` (see the module docstring); the class using
    it sets :attr:`metadata_cls`, the stock metadata's subclass with an ``eviction`` field."""

    metadata_cls: type

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.layout = SplitHeadDimLayout(kv_cache_spec.num_kv_heads, kv_cache_spec.block_size, kv_cache_spec.head_size)
        self.tables = StepTables(device)
        self.heads = HeadRowBuffers(device)
        self.steps = step_source()
        if self.steps is not None:
            manager_block_size = vllm_config.cache_config.block_size
            if kv_cache_spec.block_size != manager_block_size:
                raise RuntimeError(
                    f"kvevict: the attention kernel's block size {kv_cache_spec.block_size} differs from the KV "
                    f"cache's {manager_block_size}; eviction needs them equal (pick a --block-size the backend "
                    "supports as it is)")
            self.steps.bind_layout(list(layer_names), self.layout)
            # one build per attention group: a metadata copied across groups would lose the rows
            self.supports_update_block_table = False

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        if wants_eviction(vllm_config.additional_config):
            logger.info("kvevict: attention runs outside CUDA graphs with eviction (piecewise graphs or eager)")
            return AttentionCGSupport.NEVER
        return super().get_cudagraph_support(vllm_config, kv_cache_spec)

    def use_cascade_attention(self, *args, **kwargs) -> bool:
        """vLLM 0.26's FlashAttention builder: no cascade attention when eviction is configured."""
        if self.steps is not None:
            return False
        return super().use_cascade_attention(*args, **kwargs)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False, **kwargs):
        step = self.steps.current_step() if self.steps is not None else None
        if not step:
            return super().build(common_prefix_len, common_attn_metadata, fast_build, **kwargs)
        positional = common_attn_metadata.block_table_tensor
        rewritten = self.tables.rewrite(common_attn_metadata, step.table_rows)
        metadata = super().build(common_prefix_len, rewritten, fast_build, **kwargs)
        layout = self.layout
        eviction = GpuEviction(
            step=step,
            layout=layout,
            head_rows=self.heads.prepare(step, positional, layout.num_kv_heads, layout.block_size),
            scoring=ScoringStep.of(step, self.device),
        )
        ours = self.metadata_cls.__new__(self.metadata_cls)
        ours.__dict__.update(vars(metadata))  # the stock metadata's state, as our subclass
        ours.eviction = eviction
        return ours


class EvictingImpl:
    """Mixin for a vLLM ``AttentionImpl`` (see the module docstring)."""

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                              output_block_scale)
        eviction: Optional[GpuEviction] = getattr(attn_metadata, "eviction", None)
        if eviction is None or self.attn_type != AttentionType.DECODER:
            return out
        layer_name = getattr(layer, "layer_name", "")
        idx = layer_index(layer_name)
        if eviction.head_rows is not None:
            try:
                decode_head_rows(eviction.head_rows, idx, query, kv_cache, eviction.layout, output, self.num_heads,
                                 self.scale)
            except Exception as exc:  # never into the engine core
                logger.error("kvevict: head-granular attention failed for %s: %s",
                             sorted(r.req_id for r in eviction.step.head_rows.values()), exc)
                logger.debug("kvevict: head-granular failure", exc_info=exc)
        if eviction.step.observe:
            observe_rows_gpu(eviction.step, eviction.scoring, layer_name, idx, query, kv_cache, eviction.layout,
                             self.num_heads, self.scale, self.unsupported_for_eviction())
        if eviction.step.decode:  # torch path on the device tensors (not yet run on a GPU)
            observe_decode_rows(eviction.step, layer_name, idx, query, kv_cache, eviction.layout, self.num_heads,
                                self.scale, self.unsupported_for_eviction())
        return out

    def unsupported_for_eviction(self) -> str:
        """Why this layer cannot be scored and compacted (empty if it can)."""
        if str(self.kv_cache_dtype) not in ("auto", "bfloat16", "float16", "float32"):
            return f"KV cache dtype {self.kv_cache_dtype} is not supported by eviction"
        if self.alibi_slopes is not None or self.logits_soft_cap or self.sinks is not None \
                or getattr(self, "use_alibi_sqrt", False):
            return "eviction supports plain causal attention only (no ALiBi, soft-cap, attention sinks)"
        if tuple(self.sliding_window) != (-1, -1) or getattr(self, "chunk_lookback", -1) != -1:
            return f"eviction does not support sliding window {self.sliding_window}"
        return ""
