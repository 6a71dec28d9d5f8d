"""``laprox``: attention spread times value-output norm, normalised per layer for global selection.

``p[h, j] = ||A[h, :, j]||_2 * ||v[g, j] @ Wo[h]||_2`` (L2 over the window queries; the value
term via the ``d x d`` Gram matrix of ``Wo[h]``), mean over the group, avg-pooled with kernel
``kernel`` (:data:`LAPROX_POOL_KERNEL`), then divided by the layer's sum so every layer's
candidates sum to 1. The window is protected. Default allocation ``global``. From the abstract
and a third-party reading of the paper (arXiv:2605.07234). Validated on our suite in
docs/VALIDATION.md (question inside, ~1k tokens, n = 36 per cell): above attention-only snapkv at
0.1 (+0.19 [+0.06, +0.36]) and, under ``adakv``, at 0.2 (+0.26 [+0.13, +0.40]); the ``global``
allocation costs the needles at 0.2 (-0.26 against ``adakv``); 0 like every scorer at 0.05, so the
paper's 5% claim is untested at this length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.base import LayerInputs, LayerScores, Needs, Scorer
from vllm_kvevict.policies.ops import (
    candidates_then_protected,
    group_mean,
    pool_tokens,
    value_l2_norm,
    window_attention,
)
from vllm_kvevict.policies.registry import register_scorer

#: LaProx's pooling kernel along tokens.
LAPROX_POOL_KERNEL = 7


@dataclass(frozen=True)
class LaProx(Scorer):
    """LaProx over a window of ``window`` queries, avg-pooled with ``kernel``."""

    window: int = 32
    kernel: int = LAPROX_POOL_KERNEL

    @property
    def needs(self) -> Needs:
        return Needs(window=self.window, o_proj=True)

    def score(self, inputs: LayerInputs) -> LayerScores:
        length = inputs.seq_len
        window = min(self.window, length)
        candidates = length - window
        attn = window_attention(inputs, window)[..., :candidates]  # [H, W, Lc]
        spread = torch.linalg.vector_norm(attn, dim=1)  # [H, Lc]
        scores = group_mean(spread * value_l2_norm(inputs)[:, :candidates], inputs.num_kv_heads)
        scores = pool_tokens(scores, self.kernel, "avg")
        scores = scores / scores.sum().clamp_min(1e-30)
        return candidates_then_protected(scores, length)


@register_scorer("laprox")
def laprox(config: EvictionConfig) -> LaProx:
    return LaProx(window=config.window)
