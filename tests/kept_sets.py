"""Comparing the served plugin's choice with the reference engine's, on any CPU.

The plugin scores from vLLM's paged cache (vLLM's own GEMMs and attention kernel, chunked
prefill); the reference engine from HF transformers over the whole prompt. Their scores agree
to float rounding, and that rounding depends on the CPU (SIMD width, oneDNN blocking, thread
count): a near-tie at a selection cut could fall either way on another machine, so kept sets
are not compared bit for bit. What holds on any CPU, and is checked:

1. the served scores equal the reference's within a rounding tolerance, with the same protected
   (``+inf``) positions (:func:`assert_scores_close`);
2. the served kept set is exactly what the shared selection makes of the served scores (the
   caller re-plans from them and compares with :func:`differing_heads`).

Together: the plugin computes the reference's scores and applies the reference's selection. A
kept set that then differs from the reference engine's own is a near-tie of the scores.
"""

from __future__ import annotations

import torch

#: Relative tolerance of served against reference scores (measured differences: 2e-6 to 1e-4).
SCORE_RTOL = 1e-3


def assert_scores_close(served: list[torch.Tensor], reference: list[torch.Tensor], what: str = "") -> None:
    """Per layer ``[Hkv, L]``: same ``+inf`` positions, finite scores within :data:`SCORE_RTOL`
    of each row's largest finite reference score."""
    assert len(served) == len(reference), f"{what}: {len(served)} layers served, {len(reference)} reference"
    for layer, (s, r) in enumerate(zip(served, reference)):
        s, r = s.float(), r.float()
        assert s.shape == r.shape, f"{what} layer {layer}: shapes {tuple(s.shape)} != {tuple(r.shape)}"
        s_inf, r_inf = torch.isinf(s), torch.isinf(r)
        assert torch.equal(s_inf, r_inf), f"{what} layer {layer}: protected positions differ"
        finite = ~r_inf
        scale = torch.where(finite, r.abs(), torch.zeros_like(r)).amax(-1, keepdim=True).clamp_min(1e-30)
        err = torch.where(finite, (s - r).abs() / scale, torch.zeros_like(r))
        assert float(err.max()) <= SCORE_RTOL, f"{what} layer {layer}: scores differ by {float(err.max()):.3g} (relative)"


def differing_heads(kept: list[list[torch.Tensor]], other: list[list[torch.Tensor]]) -> int:
    """(layer, KV head) pairs whose kept positions differ."""
    return sum(int(not torch.equal(a, b)) for la, lb in zip(kept, other) for a, b in zip(la, lb))
