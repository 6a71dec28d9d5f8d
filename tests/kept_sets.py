"""Comparing the served plugin's choice with the reference engine's, on any CPU.

The plugin scores from vLLM's paged cache (vLLM's own GEMMs and attention kernel, chunked
prefill); the reference engine from HF transformers over the whole prompt. Their scores agree
to float rounding, and that rounding depends on the CPU (SIMD width, oneDNN blocking, thread
count): a near-tie at a selection cut could fall either way on another machine, so kept sets
are not compared bit for bit. What holds on any CPU, and is checked:

1. the served scores equal the reference's within a rounding tolerance, with the same protected
   and preferred positions and the same fixed head budgets (:func:`assert_scores_close`);
2. the served kept set is exactly what the shared selection makes of the served scores (the
   caller re-plans from them and compares with :func:`differing_heads`).

Together: the plugin computes the reference's scores and applies the reference's selection. A
kept set that then differs from the reference engine's own is a near-tie of the scores.
"""

from __future__ import annotations

from typing import Optional

import torch

from vllm_kvevict.policies import LayerScores

#: Relative tolerance of served against reference scores (measured differences: 2e-6 to 1e-4).
SCORE_RTOL = 1e-3


def assert_scores_close(served: list[LayerScores], reference: list[LayerScores], what: str = "") -> None:
    """Per layer ``[Hkv, L]``: the same ``protected`` and ``preferred`` masks and ``head_budgets``,
    and the values of unprotected tokens within :data:`SCORE_RTOL` of each row's largest
    unprotected reference value."""
    assert len(served) == len(reference), f"{what}: {len(served)} layers served, {len(reference)} reference"
    for layer, (s, r) in enumerate(zip(served, reference)):
        where = f"{what} layer {layer}"
        assert s.values.shape == r.values.shape, f"{where}: shapes {tuple(s.values.shape)} != {tuple(r.values.shape)}"
        assert torch.equal(s.protected, r.protected), f"{where}: protected positions differ"
        assert _same_optional(s.preferred, r.preferred), f"{where}: preferred positions differ"
        assert _same_optional(s.head_budgets, r.head_budgets), f"{where}: fixed head budgets differ"
        counted = ~r.protected
        scale = torch.where(counted, r.values.abs(), torch.zeros_like(r.values)).amax(-1, keepdim=True).clamp_min(1e-30)
        err = torch.where(counted, (s.values - r.values).abs() / scale, torch.zeros_like(r.values))
        assert float(err.max()) <= SCORE_RTOL, f"{where}: scores differ by {float(err.max()):.3g} (relative)"


def _same_optional(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def differing_heads(kept: list[list[torch.Tensor]], other: list[list[torch.Tensor]]) -> int:
    """(layer, KV head) pairs whose kept positions differ."""
    return sum(int(not torch.equal(a, b)) for la, lb in zip(kept, other) for a, b in zip(la, lb))
