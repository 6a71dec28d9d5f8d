"""The contract every scorer and allocator follows.

A *scorer* is a small object built once from the config; ``score(inputs)`` maps one layer's
tensors to :class:`LayerScores`: a worth per token (higher = more worth keeping) and the masks
of the tokens it always keeps (``protected``) or ranks above the rest (``preferred``). An
*allocator* maps the scores of every layer and a budget to per-head budgets ``B[l, g]``;
:func:`vllm_kvevict.policies.select.select_kept` then keeps each head's first ``B[l, g]`` tokens
in the order of :func:`vllm_kvevict.policies.ranking.rank`.

Everything here is float32 reference code on plain tensors: no vLLM, no model objects.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Callable, Optional

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
        (``W <= L``; at least :attr:`Needs.window` of them). ``H = G * Hkv``.
    positions : ``[L]`` logical positions of the cached tokens (``arange(L)`` after prefill).
    o_proj : ``[D, H * d]`` output-projection weight (``o_proj.weight``), for value-aware scorers.
    layer_idx, num_layers : where this layer sits (pyramid schedules).
    scale : softmax scale, ``1/sqrt(d)`` unless the model says otherwise.
    queries_pre_rope : ``[H, N, d]`` pre-RoPE queries of the prompt (or of its last part), for
        ``expected_attention``'s query statistics; ``None`` when not captured.
    rope_cos, rope_sin : ``[P, d]`` cos/sin tables of the next positions (``L .. L+P-1``), HF
        ``rotate_half`` convention, for ``expected_attention``.
    attention_sum : ``[H, L]`` accumulated attention of every query so far, for ``h2o``.
    budget_len : the request's length the budget is taken of, when not ``L`` (decode-time
        eviction scores the ``L`` held tokens of a longer request: a fractional budget reads its
        whole length); :attr:`budget_length` gives it.
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
    budget_len: Optional[int] = None

    @property
    def budget_length(self) -> int:
        """The length a scorer reading the budget takes it of (``budget_len``, else ``L``)."""
        return self.budget_len if self.budget_len is not None else self.seq_len

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


@dataclass(frozen=True, eq=False)
class LayerScores:
    """One layer's scores: what the selection ranks, per KV head.

    Selection order per head (:func:`vllm_kvevict.policies.ranking.rank`): ``protected``
    tokens first (by position), then ``preferred`` ones, then the rest, both by ``values``
    descending; ties go to the lower position.

    Attributes
    ----------
    values : ``[Hkv, L]`` float32 worth of each token (finite; meaningless where protected).
    protected : ``[Hkv, L]`` bool: always kept (window, sinks, a scorer's own always-kept tokens).
    preferred : ``[Hkv, L]`` bool or ``None``: a two-stage scorer's first stage, ranked above
        every other unprotected token.
    head_budgets : ``[Hkv]`` int64 or ``None``: set when the scorer fixed its layer's head
        budgets itself (CriticalKV under a per-layer allocation); the plan then uses them
        instead of running the allocator.
    head_shares : ``[Hkv]`` float32 or ``None``: each head's learned share of the layer's budget
        (LKV-H, added by the policy under allocation ``lkv``, which splits by them).
    residuals : ``[Hkv, L]`` float32 or ``None``: each token's value-reconstruction residual
        (VECTOR, added by the policy with ``vector`` on; the key-only route ranks by it).
    """

    values: torch.Tensor
    protected: torch.Tensor
    preferred: Optional[torch.Tensor] = None
    head_budgets: Optional[torch.Tensor] = None
    head_shares: Optional[torch.Tensor] = None
    residuals: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        shape = tuple(self.values.shape)
        if len(shape) != 2 or self.values.dtype != torch.float32:
            raise ValueError(f"values must be float32 [Hkv, L], got {self.values.dtype} {shape}")
        if self.residuals is not None and (self.residuals.dtype != torch.float32 or tuple(self.residuals.shape) != shape):
            raise ValueError(f"residuals must be float32 {shape}, got {self.residuals.dtype} {tuple(self.residuals.shape)}")
        for name in ("protected", "preferred"):
            mask = getattr(self, name)
            if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != shape):
                raise ValueError(f"{name} must be bool {shape}, got {mask.dtype} {tuple(mask.shape)}")
        if self.head_budgets is not None and tuple(self.head_budgets.shape) != shape[:1]:
            raise ValueError(f"head_budgets must be [{shape[0]}], got {tuple(self.head_budgets.shape)}")
        shares = self.head_shares
        if shares is not None and (shares.dtype != torch.float32 or tuple(shares.shape) != shape[:1]):
            raise ValueError(f"head_shares must be float32 [{shape[0]}], got {shares.dtype} {tuple(shares.shape)}")

    @classmethod
    def unprotected(cls, values: torch.Tensor) -> "LayerScores":
        """``values`` ``[Hkv, L]`` (cast to float32) with nothing protected or preferred."""
        values = values.float()
        return cls(values=values, protected=torch.zeros(values.shape, dtype=torch.bool))

    @property
    def num_kv_heads(self) -> int:
        return self.values.shape[0]

    @property
    def seq_len(self) -> int:
        return self.values.shape[1]

    @property
    def ranked_first(self) -> torch.Tensor:
        """``[Hkv, L]`` bool: protected or preferred (what page pooling counts as required)."""
        if self.preferred is None:
            return self.protected
        return self.protected | self.preferred

    def protect(self, mask: torch.Tensor) -> "LayerScores":
        """A copy with ``mask`` (``[L]`` or ``[Hkv, L]`` bool) added to :attr:`protected`."""
        return replace(self, protected=self.protected | mask.expand_as(self.protected))


@dataclass(frozen=True)
class Needs:
    """What a scorer reads beyond keys and values (the plugin captures only this).

    Attributes
    ----------
    window : window queries read (``LayerInputs.queries`` rows); 0 for none.
    query_stats : pre-RoPE queries and RoPE tables (``expected_attention``).
    attention_sums : every prompt query's accumulated attention (``h2o``).
    o_proj : the output-projection weight (value-norm scorers).
    """

    window: int = 0
    query_stats: bool = False
    attention_sums: bool = False
    o_proj: bool = False


class Scorer(ABC):
    """A token scorer, built once from the config (see the registry's factories).

    ``score`` gives the scores head granularity selects single tokens by; ``page_score`` those
    pooled into whole pages (page granularity, whole pages per head), which is ``score`` unless
    a scorer's own choice cannot be pooled (CriticalKV's first stage).
    """

    @property
    def needs(self) -> Needs:
        return Needs()

    @abstractmethod
    def score(self, inputs: LayerInputs) -> LayerScores:
        """One layer's :class:`LayerScores` (``[Hkv, L]``)."""

    def page_score(self, inputs: LayerInputs) -> LayerScores:
        """One layer's scores to pool into pages (no preferred set, no head budgets)."""
        return self.score(inputs)


#: name -> factory building the scorer from the config.
ScorerFactory = Callable[[EvictionConfig], Scorer]
#: ``allocate(scores, budget, config) -> [num_layers, Hkv]`` int64 head budgets, each in ``[0, L]``,
#: at least the head's protected and preferred count; what each layer sums to is the allocator's
#: contract (``uniform``/``adakv``: exactly ``Hkv * budget``). ``budget`` is the mean kept per head.
AllocatorFn = Callable[[list[LayerScores], int, EvictionConfig], torch.Tensor]
