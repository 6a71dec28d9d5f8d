"""``knorm``: tokens with small keys matter more (score ``-||k_j||_2``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.base import LayerInputs, LayerScores, Scorer
from vllm_kvevict.policies.registry import register_scorer


@dataclass(frozen=True)
class KNorm(Scorer):
    """Minus the key's L2 norm; reads keys only."""

    def score(self, inputs: LayerInputs) -> LayerScores:
        return LayerScores.unprotected(-torch.linalg.vector_norm(inputs.keys.float(), dim=-1))


@register_scorer("knorm")
def knorm(config: EvictionConfig) -> KNorm:
    return KNorm()
