"""Norms of each value through the output projection, computed when K/V is written.

For token ``j``, query head ``h`` (KV head ``g = h // G``) and ``Wo[h] = o_proj[:, h*d:(h+1)*d]``
(``[D, d]``): ``n1[j, h] = ||Wo[h] v[j, g]||_1`` and ``n2[j, h] = ||Wo[h] v[j, g]||_2``.
The L1 kernel streams tiles of ``Wo[h]`` and never materialises ``V @ Wo``; the L2 kernel uses
the per-head Gram matrix ``Wo[h]^T Wo[h]`` (``[d, d]``): ``n2 = sqrt(v^T Gram_h v)``.
"""

from __future__ import annotations

from typing import Optional

import torch

from vllm_kvevict.kernels._backend import HAVE_TRITON, dot_precision, next_pow2, upcast_dot_operands, use_triton


def head_gram(o_proj: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Per-head Gram matrices ``[H, d, d]`` float32 of ``o_proj [D, H*d]`` (compute once per layer)."""
    D, Hd = o_proj.shape
    w = o_proj.float().view(D, num_heads, Hd // num_heads).permute(1, 2, 0)  # [H, d, D]
    return w @ w.transpose(1, 2)


def torch_value_norms(values: torch.Tensor, o_proj: torch.Tensor, num_heads: int, p: int = 1) -> torch.Tensor:
    """Reference: ``values [N, Hkv, d]``, ``o_proj [D, H*d]`` -> ``[N, H]`` float32 p-norms."""
    N, Hkv, d = values.shape
    G = num_heads // Hkv
    D = o_proj.shape[0]
    w = o_proj.float().view(D, num_heads, d)
    v = values.float().repeat_interleave(G, dim=1)  # [N, H, d]
    proj = torch.einsum("nhd,ehd->nhe", v, w)  # [N, H, D]
    return proj.abs().sum(-1) if p == 1 else proj.norm(dim=-1)


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _value_l1_kernel(v_ptr, w_ptr, out_ptr, N, D,
                         stride_vn, stride_vh, stride_wd, stride_on,
                         G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                         UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        h = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_e = tl.arange(0, BLOCK_E)
        d_mask = offs_d < HEAD_DIM
        r_mask = rows < N
        v = tl.load(v_ptr + rows[:, None].to(tl.int64) * stride_vn + (h // G) * stride_vh + offs_d[None, :],
                    mask=r_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = tl.zeros([BLOCK_N], tl.float32)
        for e0 in range(0, D, BLOCK_E):
            e = e0 + offs_e
            w = tl.load(w_ptr + e[:, None].to(tl.int64) * stride_wd + h * HEAD_DIM + offs_d[None, :],
                        mask=(e < D)[:, None] & d_mask[None, :], other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            proj = tl.dot(v, tl.trans(w), input_precision=PRECISION)  # [BLOCK_N, BLOCK_E]
            acc += tl.sum(tl.abs(proj), 1)
        tl.store(out_ptr + rows * stride_on + h, acc, mask=r_mask)

    @triton.jit
    def _value_l2_kernel(v_ptr, gram_ptr, out_ptr, N,
                         stride_vn, stride_vh, stride_gh, stride_gr, stride_on,
                         G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_N: tl.constexpr):
        h = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        r_mask = rows < N
        v = tl.load(v_ptr + rows[:, None].to(tl.int64) * stride_vn + (h // G) * stride_vh + offs_d[None, :],
                    mask=r_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        gram = tl.load(gram_ptr + h * stride_gh + offs_d[:, None] * stride_gr + offs_d[None, :],
                       mask=d_mask[:, None] & d_mask[None, :], other=0.0)
        t = tl.dot(v, gram, input_precision="ieee")  # float32: the quadratic form cancels badly in tf32
        sq = tl.maximum(tl.sum(t * v, 1), 0.0)
        tl.store(out_ptr + rows * stride_on + h, tl.sqrt(sq), mask=r_mask)


def triton_value_norms(
    values: torch.Tensor,
    o_proj: torch.Tensor,
    num_heads: int,
    p: int = 1,
    gram: Optional[torch.Tensor] = None,
    block_n: int = 32,
    block_e: int = 64,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Triton version of :func:`torch_value_norms`; ``gram`` (:func:`head_gram`) is reused for p=2.

    ``out``: optional float32 ``[N, H]`` buffer.
    """
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p}")
    N, Hkv, d = values.shape
    G = num_heads // Hkv
    assert values.stride(-1) == 1
    if out is None:
        out = torch.empty(N, num_heads, dtype=torch.float32, device=values.device)
    assert out.shape == (N, num_heads) and out.dtype == torch.float32
    grid = (triton.cdiv(N, block_n), num_heads)
    if p == 1:
        w = o_proj.contiguous()
        _value_l1_kernel[grid](values, w, out, N, w.shape[0],
                               values.stride(0), values.stride(1), w.stride(0), out.stride(0),
                               G=G, HEAD_DIM=d, BLOCK_D=next_pow2(d), BLOCK_N=block_n, BLOCK_E=block_e,
                               UPCAST=upcast_dot_operands(), PRECISION=dot_precision(values.dtype))
    else:
        gram = head_gram(o_proj, num_heads) if gram is None else gram.float().contiguous()
        _value_l2_kernel[grid](values, gram, out, N,
                               values.stride(0), values.stride(1), gram.stride(0), gram.stride(1), out.stride(0),
                               G=G, HEAD_DIM=d, BLOCK_D=next_pow2(d), BLOCK_N=block_n)
    return out


def value_norms(values: torch.Tensor, o_proj: torch.Tensor, num_heads: int, p: int = 1,
                gram: Optional[torch.Tensor] = None, impl: str = "auto") -> torch.Tensor:
    """Dispatcher: Triton on CUDA (or under ``TRITON_INTERPRET=1``), torch otherwise."""
    if use_triton(values, impl):
        return triton_value_norms(values, o_proj, num_heads, p, gram)
    if p == 2 and gram is not None:
        v = values.float().repeat_interleave(num_heads // values.shape[1], dim=1)  # [N, H, d]
        return torch.einsum("nhd,hde,nhe->nh", v, gram.float(), v).clamp_min(0).sqrt()
    return torch_value_norms(values, o_proj, num_heads, p)
