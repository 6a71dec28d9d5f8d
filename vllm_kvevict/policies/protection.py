"""Window and sinks: the tokens every policy keeps, whatever its scorer says.

:class:`Protected` wraps a scorer and adds the observation window (last ``window`` positions)
and the sinks (first ``sinks``) to its ``protected`` mask; every allocator returns head budgets
that cover them, so they are always kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvevict.policies.base import LayerInputs, LayerScores, Needs, Scorer


def window_and_sinks(seq_len: int, window: int, sinks: int) -> torch.Tensor:
    """``[L]`` bool: the first ``sinks`` and the last ``window`` of ``seq_len`` positions."""
    mask = torch.zeros(seq_len, dtype=torch.bool)
    mask[: min(sinks, seq_len)] = True
    if window > 0:
        mask[seq_len - min(window, seq_len) :] = True
    return mask


@dataclass(frozen=True)
class Protected(Scorer):
    """``inner``'s scores with the window and the sinks protected."""

    inner: Scorer
    window: int
    sinks: int

    @property
    def needs(self) -> Needs:
        return self.inner.needs

    def score(self, inputs: LayerInputs) -> LayerScores:
        return self.inner.score(inputs).protect(window_and_sinks(inputs.seq_len, self.window, self.sinks))

    def page_score(self, inputs: LayerInputs) -> LayerScores:
        return self.inner.page_score(inputs).protect(window_and_sinks(inputs.seq_len, self.window, self.sinks))
