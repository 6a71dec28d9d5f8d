"""The contract every scorer and allocator follows.

A *scorer* maps one layer's tensors to token scores ``[Hkv, L]`` (higher = more worth keeping).
An *allocator* maps the scores of every layer and a budget to per-head budgets ``B[l, g]``.
:func:`vllm_kvevict.policies.select.select_kept` then turns scores and head budgets into kept
indices per head, always keeping the observation window and the sinks.

Everything here is float32 reference code on plain tensors: no vLLM, no model objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import torch

from vllm_kvevict.config import EvictionConfig


@dataclass
class LayerInputs:
    """What a scorer may read for one layer of one request at eviction time.

    Attributes
    ----------
    keys : ``[Hkv, L, d]`` post-RoPE keys, as the cache stores them.
    values : ``[Hkv, L, d]``.
    queries : ``[H, W, d]`` post-RoPE queries of the last ``W`` prompt positions
        (``W <= L``; the window of the config). ``H = G * Hkv``.
    positions : ``[L]`` logical positions of the cached tokens (``arange(L)`` after prefill).
    o_proj : ``[D, H * d]`` output-projection weight (``o_proj.weight``), for value-aware scorers.
    layer_idx, num_layers : where this layer sits (pyramid schedules).
    scale : softmax scale, ``1/sqrt(d)`` unless the model says otherwise.
    queries_pre_rope : ``[H, N, d]`` pre-RoPE queries of the prompt (or of its last part), for
        ``expected_attention``'s query statistics; ``None`` when not captured.
    rope_cos, rope_sin : ``[P, d]`` cos/sin tables of the next positions (``L .. L+P-1``), HF
        ``rotate_half`` convention, for ``expected_attention``.
    attention_sum : ``[H, L]`` accumulated attention of every query so far, for ``h2o``.
    """

    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor
    positions: Optional[torch.Tensor] = None
    o_proj: Optional[torch.Tensor] = None
    layer_idx: int = 0
    num_layers: int = 1
    scale: Optional[float] = None
    queries_pre_rope: Optional[torch.Tensor] = None
    rope_cos: Optional[torch.Tensor] = None
    rope_sin: Optional[torch.Tensor] = None
    attention_sum: Optional[torch.Tensor] = None
    extras: dict = field(default_factory=dict)

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[0]

    @property
    def num_heads(self) -> int:
        return self.queries.shape[0]

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def seq_len(self) -> int:
        return self.keys.shape[1]

    @property
    def head_dim(self) -> int:
        return self.keys.shape[2]

    @property
    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else self.head_dim ** -0.5


class Scorer(Protocol):
    """``scores[g, j]``: worth of token ``j`` for KV head ``g``. Shape ``[Hkv, L]``, float32."""

    def __call__(self, inputs: LayerInputs, config: EvictionConfig) -> torch.Tensor: ...


class Allocator(Protocol):
    """Per-head budgets for every layer.

    Parameters
    ----------
    scores : list over layers of ``[Hkv, L]`` (already with window and sinks forced to the top:
        see :func:`vllm_kvevict.policies.select.protect`).
    budget : tokens kept per KV head on average (window and sinks included).
    config : the policy.

    Returns
    -------
    ``[num_layers, Hkv]`` int64 head budgets, each in ``[0, L]``; what each layer sums to is the
    allocator's contract (``uniform``/``adakv``: exactly ``Hkv * budget``).
    """

    def __call__(self, scores: list[torch.Tensor], budget: int, config: EvictionConfig) -> torch.Tensor: ...


ScorerFn = Callable[[LayerInputs, EvictionConfig], torch.Tensor]
AllocatorFn = Callable[[list, int, EvictionConfig], torch.Tensor]
