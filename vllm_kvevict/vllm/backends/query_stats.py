"""Pre-RoPE query statistics of a prompt, gathered chunk by chunk, for ``expected_attention``.

``expected_attention`` needs the mean and covariance of every prompt query (sinks excluded)
before RoPE, and RoPE tables of the next positions. vLLM's attention sees post-RoPE queries of
one prefill chunk at a time, so the worker un-rotates each chunk's queries with the layer's own
``rotary_emb`` and accumulates sums (float64, ``O(H d^2)`` memory per layer whatever the prompt
length). At scoring time :meth:`QueryStats.as_queries` gives the scorer a set of ``2d`` points
per head with exactly that mean and (population) covariance, which is all the scorer reads;
short prompts keep their raw queries instead (see :meth:`QueryStats.keeps_raw`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

#: How many future positions the RoPE tables cover (kvpress's ``n_future_positions``).
FUTURE_POSITIONS = 512


def rope_cos_sin(rotary: Any, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [T, d]`` in HF ``rotate_half`` layout, from vLLM's ``cos_sin_cache``.

    Only full-width NeoX-style RoPE (Llama, Qwen, Mistral...) is supported.
    """
    if not getattr(rotary, "is_neox_style", False) or rotary.rotary_dim != rotary.head_size:
        raise ValueError("expected_attention in vLLM supports full-width NeoX-style RoPE only")
    cache = rotary.cos_sin_cache
    positions = positions.clamp(max=cache.shape[0] - 1).to(cache.device)
    cos, sin = cache[positions].float().cpu().chunk(2, dim=-1)
    return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)


def unrotate(queries: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo HF-convention RoPE: ``q = q_rot * cos - rotate_half(q_rot) * sin``.

    Parameters
    ----------
    queries : ``[T, H, d]`` post-RoPE.
    cos, sin : ``[T, d]`` tables of the queries' positions.
    """
    half = queries.shape[-1] // 2
    rotated_half = torch.cat([-queries[..., half:], queries[..., :half]], dim=-1)
    return queries * cos[:, None] - rotated_half * sin[:, None]


@dataclass
class QueryStats:
    """Running statistics of one layer's pre-RoPE prompt queries (sinks excluded)."""

    keep_raw: bool
    count: int = 0
    total: Optional[torch.Tensor] = None  # [H, d] float64
    outer: Optional[torch.Tensor] = None  # [H, d, d] float64
    raw: list = field(default_factory=list)  # of [H, n, d] float32

    @staticmethod
    def keeps_raw(prompt_len: int, sinks: int, head_dim: int) -> bool:
        """Short prompts keep raw queries: the ``2d`` synthetic points must fit after the sinks."""
        return prompt_len - sinks <= 4 * head_dim

    def add(self, queries: torch.Tensor) -> None:
        """``queries [n, H, d]`` pre-RoPE."""
        if queries.shape[0] == 0:
            return
        q = queries.transpose(0, 1)  # [H, n, d]
        if self.keep_raw:
            self.raw.append(q.float().clone())
            return
        q64 = q.double()
        total = q64.sum(dim=1)
        outer = torch.einsum("hni,hnj->hij", q64, q64)
        self.total = total if self.total is None else self.total + total
        self.outer = outer if self.outer is None else self.outer + outer
        self.count += q.shape[1]

    def as_queries(self) -> torch.Tensor:
        """``[H, N, d]`` queries whose mean and population covariance are the prompt's."""
        if self.keep_raw:
            return torch.cat(self.raw, dim=1)
        if not self.count:
            raise ValueError("no query statistics gathered")
        mean = self.total / self.count  # [H, d]
        cov = self.outer / self.count - torch.einsum("hi,hj->hij", mean, mean)
        eigvals, eigvecs = torch.linalg.eigh((cov + cov.transpose(1, 2)) / 2)
        dim = mean.shape[-1]
        spread = (eigvals.clamp_min(0) * dim).sqrt()  # [H, d]
        offsets = (eigvecs * spread[:, None, :]).transpose(1, 2)  # [H, d (which), d]
        points = torch.cat([mean[:, None] + offsets, mean[:, None] - offsets], dim=1)  # [H, 2d, d]
        return points.float()
