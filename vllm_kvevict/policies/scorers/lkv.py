"""``lkv`` (LKV-T): a learned, query-agnostic worth of every cached token, from its key and value.

The scores come from the model's trained artifact (:mod:`vllm_kvevict.lkv`): per (layer, KV
head), a small network of the token's de-rotated key, its value and its relative position, mixed
along a few neighbouring tokens (``TokenScorer``). No window queries, query statistics or
attention sums are read (:class:`~vllm_kvevict.policies.base.Needs` is empty), so a token's
worth is fixed once its K/V is written. Training and design: docs/LKV.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.lkv.artifact import LKVSource
from vllm_kvevict.policies.base import LayerInputs, LayerScores, Scorer
from vllm_kvevict.policies.registry import register_scorer


@dataclass(frozen=True)
class LKVTokens(Scorer):
    """LKV-T scores of ``source``'s artifact (resolved, and checked against the model, when
    first used)."""

    source: LKVSource

    def score(self, inputs: LayerInputs) -> LayerScores:
        artifact = self.source.artifact()
        positions = inputs.positions if inputs.positions is not None else torch.arange(inputs.seq_len)
        return LayerScores.unprotected(artifact.token_scores(inputs.layer_idx, inputs.keys, inputs.values, positions))


@register_scorer("lkv", reads_model=True)
def lkv(config: EvictionConfig, model) -> LKVTokens:
    return LKVTokens(LKVSource(model=model, path=config.lkv_artifact))
