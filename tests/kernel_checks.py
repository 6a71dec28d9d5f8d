"""Shared checks of the kernel tests: tolerances and the relative error they are held to."""

import torch

#: Relative error allowed against the float32 torch reference, by kernel dtype.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float32."""
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))
