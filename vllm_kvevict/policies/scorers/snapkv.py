"""``snapkv``: attention of the observation window, pooled along tokens, averaged per group.

``s[g, j] = mean_{h in g} pool_j( mean_t A[h, t, j] )`` over candidates ``j < L - W``; the window
is protected. Pooling: ``pooling`` / ``kernel`` (avg 5 = kvpress; the SnapKV repo uses max 7).
Same operation order as kvpress 0.5.5 ``SnapKVPress.score``.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.base import LayerInputs, LayerScores, Needs, Scorer
from vllm_kvevict.policies.ops import candidates_then_protected, pool_tokens, window_attention
from vllm_kvevict.policies.registry import register_scorer


@dataclass(frozen=True)
class SnapKV(Scorer):
    """SnapKV over a window of ``window`` queries, pooled by ``pooling`` with ``kernel``."""

    window: int = 32
    pooling: str = "avg"
    kernel: int = 5

    @property
    def needs(self) -> Needs:
        return Needs(window=self.window)

    def score(self, inputs: LayerInputs) -> LayerScores:
        window = min(self.window, inputs.seq_len)
        attn = window_attention(inputs, window)[..., : inputs.seq_len - window]
        scores = pool_tokens(attn.mean(dim=-2), self.kernel, self.pooling)
        candidates = scores.view(inputs.num_kv_heads, inputs.group_size, -1).mean(1)
        return candidates_then_protected(candidates, inputs.seq_len)


@register_scorer("snapkv")
def snapkv(config: EvictionConfig) -> SnapKV:
    return SnapKV(window=config.window, pooling=config.pooling, kernel=config.pooling_kernel)
