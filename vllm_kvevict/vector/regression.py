"""Least squares of values on keys, one (layer, KV head, key variant) at a time, from moments.

The fit is affine, ``v ~ [k, 1] @ W`` (``W [d + 1, d]``), by the normal equations with a small
ridge, solved in float64. Why not ``torch.linalg.lstsq``: calibration streams tens of
thousands of tokens per head through 30 layers x 3 KV heads x 2 key variants; lstsq needs every
token's key and value in memory at once, the normal equations only ``X^T X`` and ``X^T Y``
(``O(d^2)`` per fit), accumulated sequence by sequence. Their known weakness (the condition
number squared) is met by accumulating and solving in float64; the ridge (relative to the mean
diagonal of ``X^T X``, not on the intercept) keeps a near-constant key direction from making
the system singular.

R^2 is read from moments too, so it can be measured on held-out sequences that never entered
the fit: ``R^2 = 1 - SSE / SST`` pooled over the ``d`` value dimensions, with
``SSE = sum y^2 - 2 <W, X^T Y> + <W, X^T X W>`` and ``SST = sum y^2 - |sum y|^2 / n``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Ridge, relative to the mean diagonal of ``X^T X``.
DEFAULT_RIDGE = 1e-6


def augment(keys: torch.Tensor) -> torch.Tensor:
    """``[..., n, d] -> [..., n, d + 1]``: the keys with a constant 1 (the intercept)."""
    ones = torch.ones(keys.shape[:-1] + (1,), dtype=keys.dtype)
    return torch.cat((keys, ones), dim=-1)


@dataclass
class Moments:
    """Sufficient statistics of many independent fits, stacked on leading dims ``S``.

    Attributes
    ----------
    xtx : ``[*S, d + 1, d + 1]`` float64.
    xty : ``[*S, d + 1, d]`` float64.
    yy : ``[*S]`` float64, ``sum ||y||^2``.
    ysum : ``[*S, d]`` float64.
    count : tokens added (the same for every fit).
    """

    xtx: torch.Tensor
    xty: torch.Tensor
    yy: torch.Tensor
    ysum: torch.Tensor
    count: int = 0

    @classmethod
    def zeros(cls, shape: tuple[int, ...], head_dim: int) -> "Moments":
        f = dict(dtype=torch.float64)
        return cls(
            xtx=torch.zeros(shape + (head_dim + 1, head_dim + 1), **f),
            xty=torch.zeros(shape + (head_dim + 1, head_dim), **f),
            yy=torch.zeros(shape, **f),
            ysum=torch.zeros(shape + (head_dim,), **f),
        )

    def add(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add ``keys, values [*S, n, d]`` (``n`` tokens of every fit)."""
        x = augment(keys.double())
        y = values.double()
        self.xtx += x.transpose(-1, -2) @ x
        self.xty += x.transpose(-1, -2) @ y
        self.yy += (y * y).sum(dim=(-1, -2))
        self.ysum += y.sum(dim=-2)
        self.count += keys.shape[-2]

    def solve(self, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
        """``W [*S, d + 1, d]`` float64 minimising ``||X W - Y||^2 + lambda ||W[:d]||^2``."""
        d1 = self.xtx.shape[-1]
        diag = torch.diagonal(self.xtx, dim1=-2, dim2=-1)[..., :-1]
        lam = ridge * diag.mean(dim=-1).clamp_min(1e-30)
        eye = torch.eye(d1, dtype=torch.float64)
        eye[-1, -1] = 0.0
        system = self.xtx + lam[..., None, None] * eye
        return torch.linalg.solve(system, self.xty)

    def r2(self, weight: torch.Tensor) -> torch.Tensor:
        """``[*S]`` float64 R^2 of ``weight [*S, d + 1, d]`` on these moments."""
        sse = self.yy - 2 * (weight * self.xty).sum(dim=(-1, -2)) + (weight * (self.xtx @ weight)).sum(dim=(-1, -2))
        sst = self.yy - (self.ysum * self.ysum).sum(dim=-1) / max(self.count, 1)
        return 1.0 - sse / sst.clamp_min(1e-30)
