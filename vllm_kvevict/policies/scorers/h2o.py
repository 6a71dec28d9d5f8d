"""``h2o``: heavy hitters by accumulated attention, plus the recent half of the budget.

``s[g, j]`` = mean over the group of ``attention_sum[h, j]`` (every query's attention so far);
when ``LayerInputs.attention_sum`` is missing, the window queries' attention summed stands in.
The last ``max(W, B // 2)`` positions are protected (the recent half), so the heavy hitters fill
the other half of ``B = budget(L)`` (at decode time ``L`` is the request's whole length,
``LayerInputs.budget_length``, not the held tokens').
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.base import LayerInputs, LayerScores, Needs, Scorer
from vllm_kvevict.policies.ops import group_mean, window_attention
from vllm_kvevict.policies.protection import window_and_sinks
from vllm_kvevict.policies.registry import register_scorer


@dataclass(frozen=True)
class H2O(Scorer):
    """H2O with ``budget(L)`` tokens kept per head (``config.budget_tokens``), at least
    ``window`` of them recent."""

    window: int
    budget: Callable[[int], int] = field(repr=False)

    @property
    def needs(self) -> Needs:
        return Needs(attention_sums=True)

    def score(self, inputs: LayerInputs) -> LayerScores:
        length = inputs.seq_len
        if inputs.attention_sum is not None:
            accumulated = inputs.attention_sum.float()
        else:
            accumulated = window_attention(inputs, min(self.window, length)).sum(1)
        recent = min(length, max(self.window, self.budget(inputs.budget_length) // 2))
        scores = LayerScores.unprotected(group_mean(accumulated, inputs.num_kv_heads))
        return scores.protect(window_and_sinks(length, recent, 0))


@register_scorer("h2o")
def h2o(config: EvictionConfig) -> H2O:
    return H2O(window=config.window, budget=config.budget_tokens)
