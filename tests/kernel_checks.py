"""Shared checks of the kernel tests: tolerances, the relative error they are held to, and where
and how large they run.

By default the kernel tests run on CPU under ``TRITON_INTERPRET=1`` at small sizes (CI). On a
GPU machine the same tests run compiled and at full size::

    TRITON_INTERPRET=0 KVEVICT_KERNEL_DEVICE=cuda KVEVICT_KERNEL_SCALE=64 \\
        python -m pytest tests/unit/test_kernels_*.py
"""

import os

import torch

#: Relative error allowed against the float32 torch reference, by kernel dtype.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}

#: Device of the kernel tests' tensors (``cpu``: Triton interpreted; ``cuda``: compiled).
DEVICE = os.environ.get("KVEVICT_KERNEL_DEVICE", "cpu")

#: Multiplies the tests' lengths (tokens, window rows, value rows, output width).
SCALE = int(os.environ.get("KVEVICT_KERNEL_SCALE", "1"))

#: KV heads of the tests' caches: 2 at the small default size, 8 (a real model's) at full size.
KV_HEADS = 2 if SCALE == 1 else 8

if DEVICE != "cpu":
    # Long float32 reductions on the GPU sum in another order than the reference: hold them to
    # 1e-4 (still far under tf32's ~3e-4); bf16 keeps 1e-2.
    TOL[torch.float32] = 1e-4


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float32."""
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))
