"""A prefilled prompt: everything the policies may need, computed once and never modified.

One :class:`Prefilled` serves many (policy, budget) runs: each run copies the tokens it keeps
into its own :class:`~vllm_kvevict.reference.head_cache.HeadCache`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.lkv.identity import ModelIdentity
from vllm_kvevict.policies import LayerInputs, build_scorer
from vllm_kvevict.reference.model_parts import apply_rope

#: Next positions whose RoPE tables are captured (expected_attention averages over 512).
FUTURE_POSITIONS = 512
#: Query rows per chunk when accumulating attention for h2o.
_ATTENTION_CHUNK = 256


@dataclass
class Prefilled:
    """One prompt after its full-cache prefill.

    Attributes
    ----------
    input_ids : ``[L]`` int64.
    keys, values : per layer ``[Hkv, L, d]``; keys post-RoPE (as a cache stores them).
    queries_pre_rope : per layer ``[H, N, d]``, the last ``N`` prompt tokens (``N = L`` unless
        the prefill was asked to keep fewer).
    rope_cos, rope_sin : ``[L + FUTURE_POSITIONS, d]`` tables for positions ``0, 1, ...``.
    last_logits : ``[V]`` float32 logits after the last prompt token (the first decoded token's);
        ``None`` for a :meth:`prefix`, whose decoding must start with a suffix.
    o_proj : per layer ``[D, H * d]`` output-projection weights (the model's own tensors).
    scale : softmax scale.
    model : the model's identity (what ``lkv`` policies check their artifact against).
    """

    input_ids: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    queries_pre_rope: list[torch.Tensor]
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor
    last_logits: Optional[torch.Tensor]
    o_proj: list[torch.Tensor]
    scale: float
    model: Optional[ModelIdentity] = None
    _attention_sums: list[torch.Tensor] | None = field(default=None, repr=False)

    @property
    def prompt_len(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def num_kv_heads(self) -> int:
        return int(self.keys[0].shape[0])

    @property
    def num_queries_kept(self) -> int:
        return int(self.queries_pre_rope[0].shape[1])

    def prefix(self, length: int) -> "Prefilled":
        """The prefill of the first ``length`` tokens, sliced from this one (attention is causal).

        Lets one prefill of ``context + question`` serve both protocols: compress it all, or
        compress ``prefix(context_end)`` and feed the question after eviction.
        """
        L = self.prompt_len
        if not 0 < length <= L:
            raise ValueError(f"prefix length {length} outside 1..{L}")
        if self.num_queries_kept != L:
            raise ValueError("a prefix needs every prompt query: prefill with keep_queries=None")
        return replace(
            self,
            input_ids=self.input_ids[:length],
            keys=[k[:, :length] for k in self.keys],
            values=[v[:, :length] for v in self.values],
            queries_pre_rope=[q[:, :length] for q in self.queries_pre_rope],
            last_logits=None,
            _attention_sums=None,
        )

    def queries(self, layer: int, last: int) -> torch.Tensor:
        """Post-RoPE queries ``[H, last, d]`` of the last ``last`` prompt tokens."""
        if last > self.num_queries_kept:
            raise ValueError(f"only the last {self.num_queries_kept} queries were kept, {last} asked")
        L = self.prompt_len
        pre = self.queries_pre_rope[layer][:, self.num_queries_kept - last :]
        return apply_rope(pre, self.rope_cos[L - last : L], self.rope_sin[L - last : L])

    def attention_sum(self, layer: int) -> torch.Tensor:
        """``[H, L]``: attention each prompt token received, summed over all prompt queries (h2o)."""
        if self._attention_sums is None:
            self._attention_sums = [self._accumulate_attention(i) for i in range(self.num_layers)]
        return self._attention_sums[layer]

    def _accumulate_attention(self, layer: int) -> torch.Tensor:
        L = self.prompt_len
        if self.num_queries_kept != L:
            raise ValueError("h2o needs every prompt query: prefill with keep_queries=None")
        queries = self.queries(layer, L)  # [H, L, d]
        group = queries.shape[0] // self.num_kv_heads
        keys = self.keys[layer].repeat_interleave(group, dim=0)  # [H, L, d]
        total = torch.zeros(queries.shape[0], L, dtype=torch.float32)
        cols = torch.arange(L)
        for start in range(0, L, _ATTENTION_CHUNK):
            rows = torch.arange(start, min(L, start + _ATTENTION_CHUNK))
            scores = torch.matmul(queries[:, rows], keys.transpose(1, 2)).float() * self.scale
            scores = scores.masked_fill(cols.view(1, -1) > rows.view(-1, 1), float("-inf"))
            total += torch.softmax(scores, dim=-1).sum(dim=1)
        return total

    def layer_inputs(self, config: EvictionConfig) -> list[LayerInputs]:
        """One :class:`LayerInputs` per layer for ``config`` (window queries of ``config.window``)."""
        L = self.prompt_len
        window = min(config.window, L, self.num_queries_kept)
        positions = torch.arange(L)
        future_cos = self.rope_cos[L : L + FUTURE_POSITIONS]
        future_sin = self.rope_sin[L : L + FUTURE_POSITIONS]
        needs_attention_sum = build_scorer(config).needs.attention_sums
        return [
            LayerInputs(
                keys=self.keys[layer],
                values=self.values[layer],
                queries=self.queries(layer, window),
                positions=positions,
                o_proj=self.o_proj[layer],
                layer_idx=layer,
                num_layers=self.num_layers,
                scale=self.scale,
                queries_pre_rope=self.queries_pre_rope[layer],
                rope_cos=future_cos,
                rope_sin=future_sin,
                attention_sum=self.attention_sum(layer) if needs_attention_sum else None,
            )
            for layer in range(self.num_layers)
        ]
