"""1-D pooling of token scores along the token axis (stride 1, ``kernel // 2`` padding).

``avg`` counts the padding as zeros (``F.avg_pool1d``'s default ``count_include_pad=True``,
as SnapKV and kvpress use it); ``max`` ignores the padding.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from vllm_kvevict.kernels._backend import HAVE_TRITON, use_triton


def _check(kind: str, kernel_size: int) -> None:
    if kind not in ("avg", "max"):
        raise ValueError(f"pooling must be 'avg' or 'max', got {kind!r}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"pooling kernel must be odd and >= 1, got {kernel_size}")


def torch_pool_scores(scores: torch.Tensor, kind: str = "avg", kernel_size: int = 5) -> torch.Tensor:
    """``scores [R, L]`` -> pooled ``[R, L]`` float32."""
    _check(kind, kernel_size)
    x = scores.float().unsqueeze(1)
    pad = kernel_size // 2
    if kind == "avg":
        y = F.avg_pool1d(x, kernel_size, stride=1, padding=pad)
    else:
        y = F.max_pool1d(x, kernel_size, stride=1, padding=pad)
    return y.squeeze(1)


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _pool_kernel(x_ptr, out_ptr, L, stride_x, stride_o,
                     KSIZE: tl.constexpr, IS_MAX: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.program_id(0)
        tok = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        if IS_MAX:
            acc = tl.full([BLOCK], float("-inf"), tl.float32)
        else:
            acc = tl.zeros([BLOCK], tl.float32)
        for j in tl.static_range(KSIZE):
            src = tok + (j - KSIZE // 2)
            ok = (src >= 0) & (src < L)
            if IS_MAX:
                acc = tl.maximum(acc, tl.load(x_ptr + r * stride_x + src, mask=ok, other=float("-inf")).to(tl.float32))
            else:
                acc += tl.load(x_ptr + r * stride_x + src, mask=ok, other=0.0).to(tl.float32)
        if not IS_MAX:
            acc = acc / KSIZE
        tl.store(out_ptr + r * stride_o + tok, acc, mask=tok < L)


def triton_pool_scores(scores: torch.Tensor, kind: str = "avg", kernel_size: int = 5, block: int = 256,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Triton version of :func:`torch_pool_scores`; ``out`` is an optional float32 ``[R, L]`` buffer."""
    _check(kind, kernel_size)
    x = scores.contiguous()
    R, L = x.shape
    if out is None:
        out = torch.empty(R, L, dtype=torch.float32, device=x.device)
    assert out.shape == (R, L) and out.dtype == torch.float32 and out.stride(-1) == 1
    _pool_kernel[(R, triton.cdiv(L, block))](x, out, L, x.stride(0), out.stride(0),
                                             KSIZE=kernel_size, IS_MAX=kind == "max", BLOCK=block)
    return out


def pool_scores(scores: torch.Tensor, kind: str = "avg", kernel_size: int = 5, impl: str = "auto") -> torch.Tensor:
    """Dispatcher: Triton on CUDA (or under ``TRITON_INTERPRET=1``), torch otherwise."""
    if use_triton(scores, impl):
        return triton_pool_scores(scores, kind, kernel_size)
    return torch_pool_scores(scores, kind, kernel_size)
