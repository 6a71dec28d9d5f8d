"""Which implementation runs: Triton on CUDA tensors or under ``TRITON_INTERPRET=1``, torch otherwise."""

from __future__ import annotations

import os

import torch

try:  # Triton is optional: CPU-only installs run the torch references.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    HAVE_TRITON = False


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(x: torch.Tensor, impl: str = "auto") -> bool:
    """Pick the implementation for tensor ``x``.

    ``impl``: ``"auto"`` (Triton on CUDA or when interpreting, torch otherwise), ``"torch"`` or
    ``"triton"``.
    """
    if impl == "torch":
        return False
    if impl == "triton":
        if not HAVE_TRITON:
            raise RuntimeError("impl='triton' asked for, but triton is not importable")
        return True
    if impl != "auto":
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    return HAVE_TRITON and (x.is_cuda or interpreting())


def upcast_dot_operands() -> bool:
    """Whether kernels convert ``tl.dot`` operands to float32 before the product.

    The Triton 3.9 interpreter computes bf16 products wrongly (numpy has no bfloat16), so under
    the interpreter every operand is upcast; on the GPU bf16/fp16 operands go to the tensor
    cores as they are, with float32 accumulation.
    """
    return interpreting()


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot``: exact ``ieee`` for float32 inputs, ``tf32`` otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
