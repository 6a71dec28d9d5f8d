"""``tova``: the last query's attention, averaged over ALL query heads; same for every KV head.

The last position itself is protected (kvpress ``TOVAPress``); with ``window = 1`` the kept set
matches kvpress exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.base import LayerInputs, LayerScores, Needs, Scorer
from vllm_kvevict.policies.ops import candidates_then_protected, window_attention
from vllm_kvevict.policies.registry import register_scorer


@dataclass(frozen=True)
class TOVA(Scorer):
    """TOVA: reads the last window query only."""

    @property
    def needs(self) -> Needs:
        return Needs(window=1)

    def score(self, inputs: LayerInputs) -> LayerScores:
        attn = window_attention(inputs, 1)[..., : inputs.seq_len - 1]  # [H, 1, L-1]
        scores = attn.mean(0).expand(inputs.num_kv_heads, -1)
        return candidates_then_protected(scores, inputs.seq_len)


@register_scorer("tova")
def tova(config: EvictionConfig) -> TOVA:
    return TOVA()
