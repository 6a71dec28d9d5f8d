"""``expected_attention``: attention that future queries are expected to pay, times ``||v_j||``.

``s[g, j] = mean_{h in g} softmax_j( mu_h . k_j / sqrt(d) + k_j^T Sigma_h k_j / (2d) ) * ||v_j||_2``
over the non-sink tokens, where ``mu_h, Sigma_h`` are the mean and covariance of head ``h``'s
pre-RoPE queries (sink positions excluded) rotated by the mean RoPE matrix of the next positions
(``rope_cos``/``rope_sin``, 512 rows in kvpress). Sinks are protected. Same operation order as
kvpress 0.5.5 ``ExpectedAttentionPress`` (covariance on, value norm on, epsilon 0).

``queries_pre_rope`` ``[H, N, d]`` covers prompt positions ``L - N .. L - 1``; rows at sink
positions are dropped, as kvpress drops the first ``n_sink`` hidden states.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.base import LayerInputs, LayerScores, Needs, Scorer
from vllm_kvevict.policies.ops import repeat_kv
from vllm_kvevict.policies.protection import window_and_sinks
from vllm_kvevict.policies.registry import register_scorer


def mean_rope_matrix(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``[d, d]``: mean over the ``P`` future positions of the HF ``rotate_half`` RoPE matrix."""
    dim = cos.shape[-1]
    eye = torch.eye(dim, dtype=cos.dtype)
    swap = torch.zeros((dim, dim), dtype=cos.dtype)
    swap[dim // 2 :, : dim // 2], swap[: dim // 2, dim // 2 :] = torch.eye(dim // 2), -torch.eye(dim // 2)
    return (cos.unsqueeze(1) * eye + sin.unsqueeze(1) * swap).mean(dim=0)


def query_statistics(inputs: LayerInputs, sinks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated query mean ``[1, H, d]`` and covariance ``[1, H, d, d]``."""
    if inputs.queries_pre_rope is None or inputs.rope_cos is None or inputs.rope_sin is None:
        raise ValueError("expected_attention needs LayerInputs.queries_pre_rope, rope_cos and rope_sin")
    queries = inputs.queries_pre_rope.float()
    first_position = inputs.seq_len - queries.shape[1]
    queries = queries[:, max(0, sinks - first_position) :].unsqueeze(0)
    mu = queries.mean(dim=2, keepdim=True)
    centered = queries - mu
    cov = torch.einsum("bnsi,bnsj->bnij", centered, centered) / queries.shape[2]
    rope = mean_rope_matrix(inputs.rope_cos.float(), inputs.rope_sin.float())
    mu = torch.matmul(mu.squeeze(2), rope.T)
    cov = torch.matmul(rope, torch.matmul(cov, rope.T))
    return mu, cov


@dataclass(frozen=True)
class ExpectedAttention(Scorer):
    """Expected attention of the next queries times ``||v_j||``, the first ``sinks`` protected."""

    sinks: int = 4

    @property
    def needs(self) -> Needs:
        return Needs(query_stats=True)

    def score(self, inputs: LayerInputs) -> LayerScores:
        sinks = min(self.sinks, inputs.seq_len)
        mu, cov = query_statistics(inputs, sinks)
        keys = inputs.keys.float()[:, sinks:].unsqueeze(0)
        values = inputs.values.float()[:, sinks:].unsqueeze(0)
        dim = keys.shape[-1]
        keys = repeat_kv(keys[0], inputs.group_size).unsqueeze(0).transpose(2, 3)
        scores = torch.matmul(mu.unsqueeze(2), keys).squeeze(2) / math.sqrt(dim)
        scores += torch.einsum("bhin, bhij, bhjn->bhn", keys, cov, keys) / dim / 2
        scores = F.softmax(scores, dim=-1)
        scores = scores.view(1, inputs.num_kv_heads, inputs.group_size, -1).mean(dim=2)
        scores = scores * values.norm(dim=-1)
        padded = LayerScores.unprotected(F.pad(scores[0], (sinks, 0)))
        return padded.protect(window_and_sinks(inputs.seq_len, 0, sinks))


@register_scorer("expected_attention")
def expected_attention(config: EvictionConfig) -> ExpectedAttention:
    return ExpectedAttention(sinks=config.resolved_sinks)
