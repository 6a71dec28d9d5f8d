"""Norms of each value through the output projection, computed when K/V is written.

For token ``j``, query head ``h`` (KV head ``g = h // G``) and ``Wo[h] = o_proj[:, h*d:(h+1)*d]``
(``[D, d]``): ``n1[j, h] = ||Wo[h] v[j, g]||_1`` and ``n2[j, h] = ||Wo[h] v[j, g]||_2``.
The L1 kernel streams tiles of ``Wo[h]`` and never materialises ``V @ Wo``. The L2 kernel goes
through the per-head Gram matrix ``Gram_h = Wo[h]^T Wo[h]`` (``[d, d]``), factored once per
layer as ``Gram_h = F_h F_h^T`` (:func:`gram_factor`): ``n2^2 = v^T Gram_h v = ||v F_h||^2``, a
sum of squares. Evaluating the quadratic form directly cancels (it needed float32 products and
ran slower than torch on an H100); the factored form has no cancellation, so it runs on the
tensor cores in the values' dtype like the L1 kernel, ``G`` query heads per loaded value tile.
"""

from __future__ import annotations

from typing import Optional

import torch

from vllm_kvevict.kernels._backend import HAVE_TRITON, dot_precision, next_pow2, upcast_dot_operands, use_triton
from vllm_kvevict.kernels.paged import gather_positional


def head_gram(o_proj: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Per-head Gram matrices ``[H, d, d]`` float32 of ``o_proj [D, H*d]`` (compute once per layer)."""
    D, Hd = o_proj.shape
    w = o_proj.float().view(D, num_heads, Hd // num_heads).permute(1, 2, 0)  # [H, d, D]
    return w @ w.transpose(1, 2)


def gram_factor(gram: torch.Tensor) -> torch.Tensor:
    """``F [H, d, d]`` float32 with ``F_h F_h^T = Gram_h`` (eigen-decomposition; the Gram matrix
    is positive semi-definite, rounding below zero is clamped). Compute once per layer."""
    evals, evecs = torch.linalg.eigh(gram.detach().double().cpu())  # small: CPU LAPACK, float64
    return (evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)).float().to(gram.device)


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
    def _row_offsets(btab_ptr, rows, r_mask, stride_vn, stride_vblk, stride_vt,
                     BLOCK_SIZE: tl.constexpr, PAGED: tl.constexpr):
        """Element offset of each row's value: ``rows * stride_vn``, or, for a paged cache, its
        block (through the request's block table) and slot."""
        if PAGED:
            blk = tl.load(btab_ptr + rows // BLOCK_SIZE, mask=r_mask, other=0).to(tl.int64)
            return blk * stride_vblk + (rows % BLOCK_SIZE).to(tl.int64) * stride_vt
        return rows.to(tl.int64) * stride_vn

    @triton.jit
    def _value_l1_kernel(v_ptr, w_ptr, out_ptr, btab_ptr, N, D,
                         stride_vn, stride_vh, stride_vblk, stride_vt, stride_wd, stride_on,
                         G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                         UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, PAGED: tl.constexpr, SQUARE: tl.constexpr):
        """``||Wo[h] v||_1``, or with ``SQUARE`` ``||Wo[h] v||_2`` (sum of squares of the same
        streamed products: exact products in the weight's dtype, no Gram matrix)."""
        h = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_e = tl.arange(0, BLOCK_E)
        d_mask = offs_d < HEAD_DIM
        r_mask = rows < N
        row_off = _row_offsets(btab_ptr, rows, r_mask, stride_vn, stride_vblk, stride_vt, BLOCK_SIZE, PAGED)
        v = tl.load(v_ptr + row_off[:, None] + (h // G) * stride_vh + offs_d[None, :],
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
            if SQUARE:
                acc += tl.sum(proj * proj, 1)
            else:
                acc += tl.sum(tl.abs(proj), 1)
        if SQUARE:
            acc = tl.sqrt(acc)
        tl.store(out_ptr + rows * stride_on + h, acc, mask=r_mask)

    @triton.jit
    def _value_l2_kernel(v_ptr, f_ptr, out_ptr, btab_ptr, N,
                         stride_vn, stride_vh, stride_vblk, stride_vt, stride_fh, stride_fr, stride_on,
                         G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, PAGED: tl.constexpr):
        g = tl.program_id(1)  # one KV head: its value tile is loaded once for its G query heads
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        r_mask = rows < N
        row_off = _row_offsets(btab_ptr, rows, r_mask, stride_vn, stride_vblk, stride_vt, BLOCK_SIZE, PAGED)
        v = tl.load(v_ptr + row_off[:, None] + g * stride_vh + offs_d[None, :],
                    mask=r_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        for i in range(G):  # a loop, not unrolled: G copies of a float32 [d, d] tile hung ptxas for G=4, d=128
            h = g * G + i
            f = tl.load(f_ptr + h * stride_fh + offs_d[:, None] * stride_fr + offs_d[None, :],
                        mask=d_mask[:, None] & d_mask[None, :], other=0.0)
            if UPCAST:
                f = f.to(tl.float32)
            t = tl.dot(v, f, input_precision=PRECISION)  # [BLOCK_N, BLOCK_D]: v F_h
            tl.store(out_ptr + rows * stride_on + h, tl.sqrt(tl.sum(t * t, 1)), mask=r_mask)


def triton_value_norms(
    values: torch.Tensor,
    o_proj: torch.Tensor,
    num_heads: int,
    p: int = 1,
    gram: Optional[torch.Tensor] = None,
    block_n: int = 128,
    block_e: int = 64,
    out: Optional[torch.Tensor] = None,
    factor: Optional[torch.Tensor] = None,
    num_warps: int = 8,
    block_table: Optional[torch.Tensor] = None,
    num_tokens: Optional[int] = None,
    stream_l2: bool = False,
) -> torch.Tensor:
    """Triton version of :func:`torch_value_norms`.

    With ``block_table`` (one request's ``[max_blocks]`` positional blocks), ``values`` is a
    paged ``[num_blocks, Hkv, block_size, d]`` V cache (any strides, head dim contiguous) read in
    place, and the result is ``[num_tokens, H]`` for positions ``0 .. num_tokens - 1``
    (:func:`paged_value_norms`). ``stream_l2``: for p=2, stream ``Wo`` tiles as the L1 kernel
    does and sum squares (products exact in the weight's dtype; slower than the Gram factor,
    whose float32 factor is rounded to the values' dtype for the tensor cores).

    For p=2 pass the layer's ``factor`` (:func:`gram_factor`), or its ``gram`` (:func:`head_gram`,
    factored on each call), else both are computed from ``o_proj``. ``out``: optional float32
    ``[N, H]`` buffer. ``block_n`` rows and ``block_e`` output features per tile, ``num_warps``:
    the defaults were the fastest of a sweep on an H100 for both norms (bf16, N=4096, H=32,
    Hkv=8, d=128, D=4096; benchmarks/kernels/RESULTS.md).
    """
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p}")
    assert values.stride(-1) == 1
    if block_table is None:
        N, Hkv, d = values.shape
        table, bs = values, 1  # no table read (PAGED off)
        strides = (values.stride(0), values.stride(1), 0, 0)
    else:
        _, Hkv, bs, d = values.shape
        N = int(num_tokens)
        table = block_table.to(device=values.device, dtype=torch.int32).contiguous()
        strides = (0, values.stride(1), values.stride(0), values.stride(2))
    G = num_heads // Hkv
    paged = dict(BLOCK_SIZE=bs, PAGED=block_table is not None)
    if out is None:
        out = torch.empty(N, num_heads, dtype=torch.float32, device=values.device)
    assert out.shape == (N, num_heads) and out.dtype == torch.float32
    if p == 1 or stream_l2:
        w = o_proj.contiguous()
        _value_l1_kernel[(triton.cdiv(N, block_n), num_heads)](
            values, w, out, table, N, w.shape[0],
            *strides, w.stride(0), out.stride(0),
            G=G, HEAD_DIM=d, BLOCK_D=next_pow2(d), BLOCK_N=block_n, BLOCK_E=block_e,
            UPCAST=upcast_dot_operands(), PRECISION=dot_precision(values.dtype), num_warps=num_warps,
            SQUARE=p == 2, **paged)
    else:
        if factor is None:
            factor = gram_factor(head_gram(o_proj, num_heads) if gram is None else gram)
        f = factor.to(values.dtype).contiguous()
        _value_l2_kernel[(triton.cdiv(N, block_n), Hkv)](
            values, f, out, table, N,
            *strides, f.stride(0), f.stride(1), out.stride(0),
            G=G, HEAD_DIM=d, BLOCK_D=next_pow2(d), BLOCK_N=block_n,
            UPCAST=upcast_dot_operands(), PRECISION=dot_precision(values.dtype), num_warps=num_warps, **paged)
    return out


def value_norms(values: torch.Tensor, o_proj: torch.Tensor, num_heads: int, p: int = 1,
                gram: Optional[torch.Tensor] = None, impl: str = "auto",
                factor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dispatcher: Triton on CUDA (or under ``TRITON_INTERPRET=1``), torch otherwise."""
    if use_triton(values, impl):
        return triton_value_norms(values, o_proj, num_heads, p, gram, factor=factor)
    if p == 2 and (factor is not None or gram is not None):
        v = values.float().repeat_interleave(num_heads // values.shape[1], dim=1)  # [N, H, d]
        if factor is not None:
            return torch.einsum("nhd,hde->nhe", v, factor.float()).norm(dim=-1)
        return torch.einsum("nhd,hde,nhe->nh", v, gram.float(), v).clamp_min(0).sqrt()
    return torch_value_norms(values, o_proj, num_heads, p)


def paged_value_norms(v_cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int, o_proj: torch.Tensor,
                      num_heads: int, p: int = 1, impl: str = "auto") -> torch.Tensor:
    """:func:`value_norms` of one request's positions ``0 .. num_tokens - 1``, read in place from
    the paged V cache ``v_cache [num_blocks, Hkv, block_size, d]`` through its positional
    ``block_table [max_blocks]`` (no null block among them): ``[num_tokens, H]`` float32. Both
    norms stream ``o_proj`` (``[D, H*d]``, in the cache's dtype) tiles: exact products. The torch
    path gathers the values first."""
    if use_triton(v_cache, impl):
        return triton_value_norms(v_cache, o_proj, num_heads, p, block_table=block_table, num_tokens=num_tokens,
                                  stream_l2=True)
    values, _ = gather_positional(v_cache, block_table, num_tokens)  # [Hkv, N, d]
    return torch_value_norms(values.transpose(0, 1), o_proj, num_heads, p)
