"""Two-segment paged decode attention: each KV head's compact pages, then the positional tail.

One online softmax runs over both segments; the ``G`` query heads of a KV head share one pass
over its K/V (GQA); long contexts are split across programs (split-K) and merged by a small
reduce kernel. Layout: see :mod:`vllm_kvevict.kernels`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from vllm_kvevict.kernels._backend import HAVE_TRITON, dot_precision, next_pow2, upcast_dot_operands, use_triton
from vllm_kvevict.kernels.paged import gather_two_segment


def masked_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """The two-segment attention reference: float32 softmax over the valid tokens of each KV head.

    Every torch path of the plugin attends compacted requests through this function (the CPU
    backend's head-granular rows, and :func:`torch_paged_decode_attention`, which the Triton
    kernel is checked against).

    Parameters
    ----------
    q : ``[B, n, Hkv, G, d]`` queries (``n`` per request), grouped by the KV head they read.
    keys, values : ``[B, Hkv, T, d]`` each head's tokens (compact region, then tail).
    valid : ``[B, n, Hkv, T]`` bool: which tokens each query sees.

    Returns
    -------
    ``[B, n, Hkv, G, d]`` float32; a query that sees no token gets zeros.
    """
    logits = torch.einsum("bnkgd,bktd->bnkgt", q.float(), keys.float()) * scale
    logits = logits.masked_fill(~valid.unsqueeze(3), float("-inf"))
    m = logits.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(logits - m)
    denom = p.sum(-1, keepdim=True)
    return torch.einsum("bnkgt,bktd->bnkgd", p, values.float()) / denom.clamp_min(1e-30)


def torch_paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    compact_pages: torch.Tensor,
    compact_lens: torch.Tensor,
    block_table: torch.Tensor,
    tail_start: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: Optional[float] = None,
    key_only: Optional[Any] = None,
) -> torch.Tensor:
    """Reference: gather both segments, then :func:`masked_attention`.

    Parameters
    ----------
    q : ``[B, H, d]`` one decode query per request, ``H = G * Hkv``.
    k_cache, v_cache : ``[num_blocks, Hkv, block_size, d]``.
    compact_pages, compact_lens, block_table, tail_start, seq_lens : see
        :func:`vllm_kvevict.kernels.paged.gather_two_segment`.
    scale : softmax scale, ``1/sqrt(d)`` by default.
    key_only : VECTOR's key-only tokens after each head's ``compact_lens`` whole ones
        (:class:`~vllm_kvevict.kernels.key_only_decode.KeyOnlySegment`, read by its ``gather``).

    Returns
    -------
    ``[B, H, d]`` in ``q``'s dtype; a head with no token at all gets zeros.
    """
    B, H, d = q.shape
    Hkv = k_cache.shape[1]
    scale = d ** -0.5 if scale is None else scale
    keys, valid = gather_two_segment(k_cache, compact_pages, compact_lens, block_table, tail_start, seq_lens)
    values, _ = gather_two_segment(v_cache, compact_pages, compact_lens, block_table, tail_start, seq_lens)
    if key_only is not None:
        ko_keys, ko_values, ko_valid = key_only.gather(k_cache, v_cache, compact_pages, compact_lens)
        keys, values = torch.cat([keys.float(), ko_keys], 2), torch.cat([values.float(), ko_values], 2)
        valid = torch.cat([valid, ko_valid], 2)
    out = masked_attention(q.view(B, 1, Hkv, H // Hkv, d), keys, values, valid.unsqueeze(1), scale)
    return out.reshape(B, H, d).to(q.dtype)


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _decode_split_kernel(
        q_ptr, k_ptr, v_ptr, cpages_ptr, clens_ptr, btab_ptr, tstart_ptr, slens_ptr,
        out_ptr, part_o_ptr, part_lse_ptr,
        scale_log2, num_splits,
        stride_qb, stride_qh,
        stride_kblk, stride_kh, stride_kt,
        stride_vblk, stride_vh, stride_vt,
        stride_cpb, stride_cph, stride_clb,
        stride_btb,
        stride_ob, stride_oh,
        stride_pob, stride_poh, stride_pos,
        stride_plb, stride_plh,
        G: tl.constexpr, BLOCK_G: tl.constexpr, num_kv_heads: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
        SPLIT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ):
        b = tl.program_id(0)
        g = tl.program_id(1)
        s = tl.program_id(2)
        PAGES_PER_TILE: tl.constexpr = BLOCK_N // BLOCK_SIZE

        clen = tl.load(clens_ptr + b * stride_clb + g)
        tstart = tl.load(tstart_ptr + b)
        slen = tl.load(slens_ptr + b)
        n_cpages = tl.cdiv(clen, BLOCK_SIZE)
        tail_first = tstart // BLOCK_SIZE
        n_tpages = tl.where(slen > tstart, tl.cdiv(slen, BLOCK_SIZE) - tail_first, 0)
        total_pages = n_cpages + n_tpages
        n_tiles = tl.cdiv(total_pages, PAGES_PER_TILE)
        per_split = tl.cdiv(n_tiles, num_splits)
        tile_lo = s * per_split
        tile_hi = tl.minimum(tile_lo + per_split, n_tiles)

        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        g_mask = offs_g < G
        d_mask = offs_d < HEAD_DIM
        heads = g * G + offs_g
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=g_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        page_in_tile = offs_n // BLOCK_SIZE
        slot = offs_n % BLOCK_SIZE
        cp_base = cpages_ptr + b * stride_cpb + g * stride_cph
        bt_base = btab_ptr + b * stride_btb

        for t in range(tile_lo, tile_hi):
            u = t * PAGES_PER_TILE + page_in_tile  # virtual page of each token of the tile
            in_c = u < n_cpages
            c_bid = tl.load(cp_base + u, mask=in_c, other=0)
            c_valid = in_c & (u * BLOCK_SIZE + slot < clen)
            tb = tail_first + (u - n_cpages)
            in_t = (u >= n_cpages) & (u < total_pages)
            t_bid = tl.load(bt_base + tb, mask=in_t, other=0)
            pos = tb * BLOCK_SIZE + slot
            t_valid = in_t & (pos >= tstart) & (pos < slen) & (t_bid > 0)
            # compact: head-page id -> (block, plane); tail: block of the table, plane g
            c_bid = c_bid.to(tl.int64)
            blk = tl.where(in_c, c_bid // num_kv_heads, t_bid.to(tl.int64))
            plane = tl.where(in_c, c_bid % num_kv_heads, g)
            valid = c_valid | t_valid

            kv_mask = valid[:, None] & d_mask[None, :]
            k = tl.load(k_ptr + blk[:, None] * stride_kblk + plane[:, None] * stride_kh + slot[:, None] * stride_kt
                        + offs_d[None, :], mask=kv_mask, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            logits = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            logits = tl.where(valid[None, :], logits, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(logits, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(logits - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + blk[:, None] * stride_vblk + plane[:, None] * stride_vh + slot[:, None] * stride_vt
                        + offs_d[None, :], mask=kv_mask, other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        if not SPLIT:
            tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
        else:
            lse2 = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
            tl.store(part_o_ptr + b * stride_pob + heads[:, None] * stride_poh + s * stride_pos
                     + offs_d[None, :], out, mask=g_mask[:, None] & d_mask[None, :])
            tl.store(part_lse_ptr + b * stride_plb + heads * stride_plh + s, lse2, mask=g_mask)

    @triton.jit
    def _decode_reduce_kernel(
        part_o_ptr, part_lse_ptr, out_ptr, num_splits,
        stride_pob, stride_poh, stride_pos,
        stride_plb, stride_plh,
        stride_ob, stride_oh,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        s_mask = offs_s < num_splits
        d_mask = offs_d < HEAD_DIM
        lse = tl.load(part_lse_ptr + b * stride_plb + h * stride_plh + offs_s, mask=s_mask, other=float("-inf"))
        m = tl.max(lse, 0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp2(lse - m_safe)
        o = tl.load(part_o_ptr + b * stride_pob + h * stride_poh + offs_s[:, None] * stride_pos + offs_d[None, :],
                    mask=s_mask[:, None] & d_mask[None, :], other=0.0)
        o = tl.where((w > 0)[:, None], o, 0.0)  # an empty split may hold anything but NaN-free zeros
        denom = tl.sum(w, 0)
        out = tl.sum(o * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def default_num_splits(q: torch.Tensor, k_cache: torch.Tensor, compact_pages: torch.Tensor,
                       block_table: torch.Tensor) -> int:
    """Splits per (request, KV head): about 8 programs per SM, so the last wave is short and
    ragged heads even out, without splits under ~512 tokens. Uses table capacities only (no
    device sync)."""
    B = q.shape[0]
    Hkv, bs = k_cache.shape[1], k_cache.shape[2]
    max_tokens = (compact_pages.shape[-1] + block_table.shape[-1]) * bs
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
    want = math.ceil(8 * sms / max(1, B * Hkv))
    return int(max(1, min(want, max_tokens // 512, 64)))


def triton_paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    compact_pages: torch.Tensor,
    compact_lens: torch.Tensor,
    block_table: torch.Tensor,
    tail_start: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: Optional[float] = None,
    num_splits: Optional[int] = None,
    block_n: Optional[int] = None,
    out: Optional[torch.Tensor] = None,
    num_warps: int = 4,
    num_stages: Optional[int] = 2,
    key_only: Optional[Any] = None,
) -> torch.Tensor:
    """Triton version of :func:`torch_paged_decode_attention` (same arguments and result).

    ``key_only``: VECTOR's key-only tokens after each head's ``compact_lens`` whole ones
    (:class:`~vllm_kvevict.kernels.key_only_decode.KeyOnlySegment`), attended as one more split.

    ``num_splits``: programs per (request, KV head) along the tokens (split-K; the partial
    results are merged by a reduce kernel); ``None`` picks :func:`default_num_splits`.
    ``block_n``: tokens per tile, a multiple of the block size (default ``max(128, block_size)``).
    ``num_warps``, ``num_stages``: launch options of the split kernel. The defaults (128-token
    tiles, 4 warps, 2 stages) were the fastest of a sweep on an H100 (bf16, d=128, bs=16, G=4) on
    all four benchmark shapes (benchmarks/kernels/RESULTS.md).
    """
    B, H, d = q.shape
    Hkv, bs = k_cache.shape[1], k_cache.shape[2]
    assert H % Hkv == 0, "query heads must be a multiple of KV heads"
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and q.stride(-1) == 1
    G = H // Hkv
    scale = d ** -0.5 if scale is None else scale
    splits = default_num_splits(q, k_cache, compact_pages, block_table) if num_splits is None else int(num_splits)
    block_n = max(128, bs) if block_n is None else block_n
    assert block_n % bs == 0 and block_n == next_pow2(block_n)
    out = torch.empty_like(q) if out is None else out
    compact_pages = compact_pages.to(torch.int32).contiguous()
    compact_lens = compact_lens.to(torch.int32).contiguous()
    block_table = block_table.to(torch.int32).contiguous()
    tail_start = tail_start.to(torch.int32).contiguous()
    seq_lens = seq_lens.to(torch.int32).contiguous()
    total = splits + (key_only is not None)  # the key-only tokens are the last split
    if total > 1:
        part_o = torch.empty(B, H, total, d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(B, H, total, dtype=torch.float32, device=q.device)
    else:
        part_o = torch.empty(1, 1, 1, 1, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(1, 1, 1, dtype=torch.float32, device=q.device)
    BLOCK_D = next_pow2(d)
    _decode_split_kernel[(B, Hkv, splits)](
        q, k_cache, v_cache, compact_pages, compact_lens, block_table, tail_start, seq_lens,
        out, part_o, part_lse,
        scale * 1.4426950408889634, splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        compact_pages.stride(0), compact_pages.stride(1), compact_lens.stride(0),
        block_table.stride(0),
        out.stride(0), out.stride(1),
        part_o.stride(0), part_o.stride(1), part_o.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        G=G, BLOCK_G=max(16, next_pow2(G)), num_kv_heads=Hkv, HEAD_DIM=d, BLOCK_D=BLOCK_D,
        BLOCK_SIZE=bs, BLOCK_N=block_n, SPLIT=total > 1,
        UPCAST=upcast_dot_operands(), PRECISION=dot_precision(q.dtype),
        num_warps=num_warps, **({} if num_stages is None else {"num_stages": num_stages}),
    )
    if key_only is not None:
        key_only.launch(q, k_cache, v_cache, compact_pages, compact_lens, part_o, part_lse, splits,
                        scale * 1.4426950408889634, block_n, num_warps)
    if total > 1:
        _decode_reduce_kernel[(B, H)](
            part_o, part_lse, out, total,
            part_o.stride(0), part_o.stride(1), part_o.stride(2),
            part_lse.stride(0), part_lse.stride(1),
            out.stride(0), out.stride(1),
            HEAD_DIM=d, BLOCK_D=BLOCK_D, BLOCK_S=next_pow2(total),
            num_warps=4,
        )
    return out


def paged_decode_attention(*args, impl: str = "auto", **kwargs) -> torch.Tensor:
    """Dispatcher: Triton on CUDA (or under ``TRITON_INTERPRET=1``), the torch reference otherwise.

    Arguments as :func:`torch_paged_decode_attention` (``key_only`` included); Triton-only keywords (``num_splits``,
    ``block_n``, ``out``, ``num_warps``, ``num_stages``) are ignored by the torch path.
    """
    q = args[0] if args else kwargs["q"]
    if use_triton(q, impl):
        return triton_paged_decode_attention(*args, **kwargs)
    for key in ("num_splits", "block_n", "out", "num_warps", "num_stages"):
        kwargs.pop(key, None)
    return torch_paged_decode_attention(*args, **kwargs)
