"""``streamingllm``: keep the sinks and the most recent tokens (score = position)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.base import LayerInputs, LayerScores, Scorer
from vllm_kvevict.policies.registry import register_scorer


@dataclass(frozen=True)
class StreamingLLM(Scorer):
    """Recency ``j``; the sinks (4 by default for this scorer) are the policy's to protect."""

    def score(self, inputs: LayerInputs) -> LayerScores:
        recency = torch.arange(inputs.seq_len, dtype=torch.float32)
        return LayerScores.unprotected(recency.expand(inputs.num_kv_heads, -1).clone())


@register_scorer("streamingllm")
def streamingllm(config: EvictionConfig) -> StreamingLLM:
    return StreamingLLM()
