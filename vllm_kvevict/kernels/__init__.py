"""GPU kernels of the plugin (Triton) and the torch references they must match.

Data layout (the plugin follows it)
-----------------------------------
- **Paged cache**, per layer: ``k_cache`` and ``v_cache`` each ``[num_blocks, Hkv, block_size,
  head_dim]``: vLLM CPU's head-major ``LBHNC`` layout for one layer. Any strides work as long
  as the head dim is contiguous: ``kv[0]``, ``kv[1]`` of a ``[2, num_blocks, ...]`` tensor, and
  vLLM GPU's ``[num_blocks, block_size, Hkv, head_dim]`` cache seen through ``.transpose(1, 2)``,
  are fine. One ``(block, kv_head)`` plane of ``block_size`` slots is a *head-page*.
- **Compact region** (what eviction kept), per (layer, KV head): ``compact_pages[req, kv_head,
  max_pages]`` int32 **head-page ids** and ``compact_lens[req, kv_head]`` tokens. A head-page id
  is ``block * Hkv + plane``: any plane of any block, so the heads of a layer share the planes
  of the compaction's fresh blocks however unequal their budgets (ARCHITECTURE's ``K =
  ceil(max_l Bbar_l / bs) + 1`` blocks bound needs this). Token ``i`` of head ``g`` lives in
  head-page ``p = compact_pages[req, g, i // block_size]`` (block ``p // Hkv``, plane
  ``p % Hkv``), slot ``i % block_size``. With one plane per head in every block, use
  :func:`head_page_ids` (``block * Hkv + g``). Lengths are ragged across heads and may be 0 or 1;
  entries past ``ceil(len / block_size)`` are never read.
- **Positional tail**: the request's vLLM block table ``block_table[req, max_blocks]`` int32;
  position ``p`` is in block ``block_table[req, p // block_size]``, slot ``p % block_size``, every
  plane. The tail is ``tail_start[req] .. seq_lens[req] - 1`` (``tail_start`` need not be
  block-aligned; slots before it are ignored).
- **Null blocks**: a block id ``<= 0`` in a positional block table is null and its slots are
  skipped (vLLM's null block is block 0; ``-1`` padding is accepted too). Block 0 therefore never
  holds live tokens.
- Index tensors may be int32 or int64 (the Triton wrappers convert to int32); softmax and
  statistics are computed in float32; outputs of attention keep the query dtype, scores and
  norms are float32.

Kernels (each ``torch_<name>`` reference, ``triton_<name>`` wrapper, ``<name>`` dispatcher that
runs Triton on CUDA tensors or under ``TRITON_INTERPRET=1``, torch otherwise, ``impl=`` forces
one):

- :func:`paged_decode_attention`: two-segment decode attention, GQA, split-K; its torch
  reference is built on :func:`masked_attention`, the one two-segment attention reference
  (the CPU backend's head-granular rows attend through it too). The Triton wrapper also reads
  VECTOR's key-only tokens (two keys to a slot after each head's whole tokens, values rebuilt
  from the keys in the kernel) given a :class:`~.key_only_decode.KeyOnlySegment`.
- :func:`window_lse` then :func:`window_scores`, then :func:`pool_scores`: the window rows'
  log-sum-exp, the window attention statistics (sum, mean, max, sum of squares per KV head or
  per query head) for scoring in the last prefill chunk, and their pooling.
- :func:`value_norms`, :func:`head_gram`, :func:`gram_factor`: ``||Wo[h] v||_1`` / ``||Wo[h] v||_2``
  per token; :func:`paged_value_norms` reads one request's values in place from the paged cache.
- :func:`compact`: gather kept entries into head-pages, batched over requests.

:mod:`vllm_kvevict.kernels.synthetic` builds random caches in this layout (tests, benchmarks).

This package never imports vLLM.
"""

from vllm_kvevict.kernels.compaction import compact, torch_compact, triton_compact
from vllm_kvevict.kernels.decode_attention import (
    masked_attention,
    paged_decode_attention,
    torch_paged_decode_attention,
    triton_paged_decode_attention,
)
from vllm_kvevict.kernels.paged import gather_positional, gather_two_segment, head_page_ids
from vllm_kvevict.kernels.pooling import pool_scores, torch_pool_scores, triton_pool_scores
from vllm_kvevict.kernels.value_norms import (
    gram_factor,
    head_gram,
    paged_value_norms,
    torch_value_norms,
    triton_value_norms,
    value_norms,
)
from vllm_kvevict.kernels.window_scoring import (
    STATISTICS,
    torch_window_lse,
    torch_window_scores,
    triton_window_lse,
    triton_window_scores,
    window_lse,
    window_scores,
)

__all__ = [
    "STATISTICS",
    "compact",
    "gather_positional",
    "gather_two_segment",
    "gram_factor",
    "head_gram",
    "head_page_ids",
    "masked_attention",
    "paged_decode_attention",
    "paged_value_norms",
    "pool_scores",
    "torch_compact",
    "torch_paged_decode_attention",
    "torch_pool_scores",
    "torch_value_norms",
    "torch_window_lse",
    "torch_window_scores",
    "triton_compact",
    "triton_paged_decode_attention",
    "triton_pool_scores",
    "triton_value_norms",
    "triton_window_lse",
    "triton_window_scores",
    "value_norms",
    "window_lse",
    "window_scores",
]
