"""``value_aware``: how much the window's attention outputs would move if a token were removed.

For window query ``t`` of head ``h`` with output ``a_t = sum_j A[t, j] v_j``, removing token ``j``
(mass ``P = A[t, j]``) changes the output by ``P / (1 - P) * (a_t - v_j)``; through the output
projection its size is ``||(...) @ Wo[h]||_2``, computed with the Gram matrix
``G_h = Wo[h] Wo[h]^T``. Score = mean over window queries, then over the group. Blocks are single
tokens here (page-level aggregation happens in :func:`vllm_kvevict.policies.page_scores`). The
window is protected. Our derivation (ALGORITHMS.md); arXiv:2605.08234's abstract describes
its probe the same way (attention mass with the output change of removing a block).
Validated on our suite in docs/VALIDATION.md (question inside, ~1k tokens, n = 36 per cell): against
snapkv with the same allocation +0.08 / +0.11 at 0.1 (uniform / adakv, not resolved) and -0.01 /
+0.06 at 0.2; no scorer effect resolved at 0.05-0.2 (the default's lead over snapkv's default is
the allocation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.base import LayerInputs, LayerScores, Needs, Scorer
from vllm_kvevict.policies.ops import candidates_then_protected, group_mean, output_gram, repeat_kv, window_attention
from vllm_kvevict.policies.registry import register_scorer


@dataclass(frozen=True)
class ValueAware(Scorer):
    """Output change of the ``window`` last queries when a token is removed."""

    window: int = 32

    @property
    def needs(self) -> Needs:
        return Needs(window=self.window, o_proj=True)

    def score(self, inputs: LayerInputs) -> LayerScores:
        length = inputs.seq_len
        window = min(self.window, length)
        candidates = length - window
        attn = window_attention(inputs, window)  # [H, W, L]
        values = repeat_kv(inputs.values.float(), inputs.group_size)  # [H, L, d]
        gram = output_gram(inputs)  # [H, d, d]
        outputs = attn @ values  # [H, W, d]
        out_gram = outputs @ gram  # [H, W, d]
        aga = (out_gram * outputs).sum(-1, keepdim=True)  # [H, W, 1]
        agv = out_gram @ values[:, :candidates].transpose(1, 2)  # [H, W, Lc]
        vgv = torch.einsum("hld,hde,hle->hl", values[:, :candidates], gram, values[:, :candidates])
        distance = (aga - 2 * agv + vgv[:, None]).clamp_min(0).sqrt()
        mass = attn[..., :candidates]
        change = mass / (1 - mass).clamp_min(1e-6) * distance
        return candidates_then_protected(group_mean(change.mean(1), inputs.num_kv_heads), length)


@register_scorer("value_aware")
def value_aware(config: EvictionConfig) -> ValueAware:
    return ValueAware(window=config.window)
