"""Window scoring for the last prefill chunk: attention statistics of the window queries.

For window row ``w`` of query head ``h`` (KV head ``g = h // G``) and cached token ``j``,
``a[h, w, j] = exp(q[w, h] . k[g, j] * scale - lse[h, w])`` (zero where ``j > q_pos[w]``:
causal masking inside the window). One pass over the keys reduces ``a`` over the window (and,
unless ``per_query_head``, over the group) into the statistics the scorers need:

- ``sum``  : ``sum_{h in group, w} a``
- ``mean`` : ``sum / (G * W)`` (``sum / W`` per query head), masked entries count as zeros
- ``max``  : ``max_{h in group, w} a``
- ``sumsq``: ``sum_{h in group, w} a ** 2``

Keys are read from the request's positional block table (before compaction every token is
positional); slots of null blocks score 0.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from vllm_kvevict.kernels._backend import HAVE_TRITON, dot_precision, next_pow2, upcast_dot_operands, use_triton
from vllm_kvevict.kernels.paged import gather_positional

STATISTICS = ("sum", "mean", "max", "sumsq")


def _check_stats(stats: Sequence[str]) -> tuple[str, ...]:
    stats = tuple(stats)
    bad = [s for s in stats if s not in STATISTICS]
    if bad or not stats or len(set(stats)) != len(stats):
        raise ValueError(f"stats must be distinct names from {STATISTICS}, got {stats}")
    return stats


def default_query_positions(seq_len: int, window: int, device=None) -> torch.Tensor:
    """Positions ``seq_len - W .. seq_len - 1`` of the window rows."""
    return torch.arange(seq_len - window, seq_len, device=device)


def torch_window_lse(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
    q_pos: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    chunk: int = 4096,
) -> torch.Tensor:
    """Log-sum-exp of each window row over the causal keys, float32 ``[H, W]``.

    ``q`` ``[W, H, d]``; keys are gathered from ``block_table`` ``[max_blocks]`` (one request)
    ``chunk`` keys at a time, so memory stays ``O(H * W * chunk)``. A row that sees no key
    (only null blocks) gets ``-inf``.
    """
    W, H, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    q_pos = default_query_positions(seq_len, W, q.device) if q_pos is None else q_pos.to(q.device)
    keys, valid = gather_positional(k_cache, block_table, seq_len)  # [Hkv, L, d]
    Hkv = keys.shape[0]
    qf = q.float().permute(1, 0, 2).reshape(Hkv, H // Hkv * W, d)
    lse = torch.full((Hkv, H // Hkv * W), float("-inf"), device=q.device)
    for j0 in range(0, seq_len, chunk):
        kc = keys[:, j0:j0 + chunk].float()
        logits = torch.einsum("krd,ktd->krt", qf, kc) * scale
        tok = torch.arange(j0, j0 + kc.shape[1], device=q.device)
        ok = valid[j0:j0 + chunk].view(1, -1) & (tok.view(1, -1) <= q_pos.view(-1, 1))  # [W, t]
        logits = logits.view(Hkv, H // Hkv, W, -1).masked_fill(~ok, float("-inf")).view(Hkv, H // Hkv * W, -1)
        lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))
    return lse.view(H, W)


def torch_window_scores(
    q: torch.Tensor,
    lse: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
    q_pos: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    stats: Sequence[str] = ("mean",),
    per_query_head: bool = False,
) -> dict[str, torch.Tensor]:
    """Reference window statistics.

    Parameters
    ----------
    q : ``[W, H, d]`` window queries (post-RoPE).
    lse : ``[H, W]`` natural-log log-sum-exp of each row (:func:`window_lse`).
    k_cache : ``[num_blocks, Hkv, block_size, d]``; block_table : ``[max_blocks]`` one request.
    seq_len : cached tokens ``L``; q_pos : ``[W]`` positions of the rows (default the last W).
    stats : names from :data:`STATISTICS`.
    per_query_head : reduce over the window only (rows ``[H, L]``) instead of window and group.

    Returns
    -------
    ``{name: [Hkv, L]}`` (or ``[H, L]``) float32.
    """
    stats = _check_stats(stats)
    W, H, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    q_pos = default_query_positions(seq_len, W, q.device) if q_pos is None else q_pos.to(q.device)
    keys, valid = gather_positional(k_cache, block_table, seq_len)
    Hkv = keys.shape[0]
    G = H // Hkv
    logits = torch.einsum("whd,htd->hwt", q.float(), keys.float().repeat_interleave(G, 0)) * scale
    a = torch.exp(logits - lse.float().unsqueeze(-1))
    tok = torch.arange(seq_len, device=q.device)
    ok = valid.view(1, 1, -1) & (tok.view(1, 1, -1) <= q_pos.view(1, -1, 1))
    a = a.masked_fill(~ok, 0.0)  # [H, W, L]
    if not per_query_head:
        a = a.view(Hkv, G * W, seq_len)
    out = {"sum": a.sum(1), "max": a.amax(1), "sumsq": (a * a).sum(1)}
    out["mean"] = out["sum"] / a.shape[1]
    return {s: out[s] for s in stats}


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _load_key_tile(k_ptr, btab_ptr, g, tok, in_seq, offs_d, d_mask, stride_kblk, stride_kh, stride_kt,
                       BLOCK_SIZE: tl.constexpr, UPCAST: tl.constexpr):
        """Keys of KV head ``g`` at positions ``tok`` through the positional block table; null
        blocks (id <= 0) and positions past the sequence read as zeros and are not ``valid``."""
        bid = tl.load(btab_ptr + tok // BLOCK_SIZE, mask=in_seq, other=0)
        valid = in_seq & (bid > 0)
        k = tl.load(k_ptr + bid.to(tl.int64)[:, None] * stride_kblk + g * stride_kh
                    + (tok % BLOCK_SIZE)[:, None] * stride_kt + offs_d[None, :],
                    mask=valid[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        return k, valid

    @triton.jit
    def _window_scores_kernel(
        q_ptr, lse_ptr, qpos_ptr, k_ptr, btab_ptr, out_ptr,
        seq_len, W, scale_log2,
        stride_qw, stride_qh, stride_lh,
        stride_kblk, stride_kh, stride_kt,
        stride_os, stride_or,
        G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
        PER_HEAD: tl.constexpr,
        I_SUM: tl.constexpr, I_MEAN: tl.constexpr, I_MAX: tl.constexpr, I_SQ: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ):
        g = tl.program_id(0)
        tok = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        in_seq = tok < seq_len
        k, valid = _load_key_tile(k_ptr, btab_ptr, g, tok, in_seq, offs_d, d_mask, stride_kblk, stride_kh,
                                  stride_kt, BLOCK_SIZE, UPCAST)

        g_sum = tl.zeros([BLOCK_N], tl.float32)
        g_max = tl.zeros([BLOCK_N], tl.float32)
        g_sq = tl.zeros([BLOCK_N], tl.float32)
        for hh in range(G):
            h = g * G + hh
            h_sum = tl.zeros([BLOCK_N], tl.float32)
            h_max = tl.zeros([BLOCK_N], tl.float32)
            h_sq = tl.zeros([BLOCK_N], tl.float32)
            for w0 in range(0, W, BLOCK_W):
                rows = w0 + tl.arange(0, BLOCK_W)
                r_mask = rows < W
                qt = tl.load(q_ptr + rows[:, None] * stride_qw + h * stride_qh + offs_d[None, :],
                             mask=r_mask[:, None] & d_mask[None, :], other=0.0)
                if UPCAST:
                    qt = qt.to(tl.float32)
                lse = tl.load(lse_ptr + h * stride_lh + rows, mask=r_mask, other=0.0)
                qpos = tl.load(qpos_ptr + rows, mask=r_mask, other=-1)
                logits = tl.dot(qt, tl.trans(k), input_precision=PRECISION) * scale_log2
                ok = r_mask[:, None] & valid[None, :] & (tok[None, :] <= qpos[:, None])
                a = tl.where(ok, tl.exp2(logits - lse[:, None] * 1.4426950408889634), 0.0)
                h_sum += tl.sum(a, 0)
                h_max = tl.maximum(h_max, tl.max(a, 0))
                h_sq += tl.sum(a * a, 0)
            if PER_HEAD:
                base = out_ptr + h * stride_or + tok
                if I_SUM >= 0:
                    tl.store(base + I_SUM * stride_os, h_sum, mask=in_seq)
                if I_MEAN >= 0:
                    tl.store(base + I_MEAN * stride_os, h_sum / W, mask=in_seq)
                if I_MAX >= 0:
                    tl.store(base + I_MAX * stride_os, h_max, mask=in_seq)
                if I_SQ >= 0:
                    tl.store(base + I_SQ * stride_os, h_sq, mask=in_seq)
            else:
                g_sum += h_sum
                g_max = tl.maximum(g_max, h_max)
                g_sq += h_sq
        if not PER_HEAD:
            base = out_ptr + g * stride_or + tok
            if I_SUM >= 0:
                tl.store(base + I_SUM * stride_os, g_sum, mask=in_seq)
            if I_MEAN >= 0:
                tl.store(base + I_MEAN * stride_os, g_sum / (W * G), mask=in_seq)
            if I_MAX >= 0:
                tl.store(base + I_MAX * stride_os, g_max, mask=in_seq)
            if I_SQ >= 0:
                tl.store(base + I_SQ * stride_os, g_sq, mask=in_seq)

    @triton.jit
    def _window_lse_partial_kernel(
        q_ptr, qpos_ptr, k_ptr, btab_ptr, m_ptr, l_ptr,
        seq_len, W, scale_log2,
        stride_qw, stride_qh,
        stride_kblk, stride_kh, stride_kt,
        stride_pt,
        G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """Per key tile: row max ``m`` (log2 units) and ``l = sum exp2(logit - m)`` of every row."""
        g = tl.program_id(0)
        tile = tl.program_id(1)
        tok = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        in_seq = tok < seq_len
        k, valid = _load_key_tile(k_ptr, btab_ptr, g, tok, in_seq, offs_d, d_mask, stride_kblk, stride_kh,
                                  stride_kt, BLOCK_SIZE, UPCAST)
        for hh in range(G):
            h = g * G + hh
            for w0 in range(0, W, BLOCK_W):
                rows = w0 + tl.arange(0, BLOCK_W)
                r_mask = rows < W
                qt = tl.load(q_ptr + rows[:, None] * stride_qw + h * stride_qh + offs_d[None, :],
                             mask=r_mask[:, None] & d_mask[None, :], other=0.0)
                if UPCAST:
                    qt = qt.to(tl.float32)
                qpos = tl.load(qpos_ptr + rows, mask=r_mask, other=-1)
                logits = tl.dot(qt, tl.trans(k), input_precision=PRECISION) * scale_log2
                ok = valid[None, :] & (tok[None, :] <= qpos[:, None])
                logits = tl.where(ok, logits, float("-inf"))
                m = tl.max(logits, 1)
                m_safe = tl.where(m == float("-inf"), 0.0, m)
                total = tl.sum(tl.exp2(logits - m_safe[:, None]), 1)
                tl.store(m_ptr + tile * stride_pt + h * W + rows, m, mask=r_mask)
                tl.store(l_ptr + tile * stride_pt + h * W + rows, total, mask=r_mask)


def triton_window_lse(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
    q_pos: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    block_n: int = 64,
    block_w: int = 16,
) -> torch.Tensor:
    """Triton version of :func:`torch_window_lse`: one pass over the keys writes a partial
    (max, sum) per key tile and row; torch merges the tiles (``[n_tiles, H * W]``, small)."""
    W, H, d = q.shape
    Hkv, bs = k_cache.shape[1], k_cache.shape[2]
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1
    scale = d ** -0.5 if scale is None else scale
    q_pos = default_query_positions(seq_len, W, q.device) if q_pos is None else q_pos
    q_pos = q_pos.to(device=q.device, dtype=torch.int32).contiguous()
    block_table = block_table.to(torch.int32).contiguous()
    n_tiles = triton.cdiv(seq_len, block_n)
    m = torch.empty(n_tiles, H * W, dtype=torch.float32, device=q.device)
    total = torch.empty_like(m)
    _window_lse_partial_kernel[(Hkv, n_tiles)](
        q, q_pos, k_cache, block_table, m, total,
        seq_len, W, scale * 1.4426950408889634,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        m.stride(0),
        G=H // Hkv, HEAD_DIM=d, BLOCK_D=next_pow2(d), BLOCK_SIZE=bs, BLOCK_N=block_n,
        BLOCK_W=max(16, min(block_w, next_pow2(W))),
        UPCAST=upcast_dot_operands(), PRECISION=dot_precision(q.dtype),
        num_warps=4,
    )
    lse2 = torch.where(total > 0, m + torch.log2(total.clamp_min(1e-38)), torch.full_like(m, float("-inf")))
    return torch.logsumexp(lse2 * 0.6931471805599453, dim=0).view(H, W)


def window_lse(*args, impl: str = "auto", **kwargs) -> torch.Tensor:
    """Dispatcher: Triton on CUDA (or under ``TRITON_INTERPRET=1``), torch otherwise."""
    q = args[0] if args else kwargs["q"]
    if use_triton(q, impl):
        kwargs.pop("chunk", None)
        return triton_window_lse(*args, **kwargs)
    for key in ("block_n", "block_w"):
        kwargs.pop(key, None)
    return torch_window_lse(*args, **kwargs)


def triton_window_scores(
    q: torch.Tensor,
    lse: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
    q_pos: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    stats: Sequence[str] = ("mean",),
    per_query_head: bool = False,
    block_n: int = 64,
    block_w: int = 16,
    out: Optional[torch.Tensor] = None,
) -> dict[str, torch.Tensor]:
    """Triton version of :func:`torch_window_scores` (same arguments and result).

    ``out``: optional float32 ``[len(stats), Hkv or H, L]`` buffer the statistics are written to.
    """
    stats = _check_stats(stats)
    W, H, d = q.shape
    Hkv, bs = k_cache.shape[1], k_cache.shape[2]
    G = H // Hkv
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1
    scale = d ** -0.5 if scale is None else scale
    q_pos = default_query_positions(seq_len, W, q.device) if q_pos is None else q_pos
    q_pos = q_pos.to(device=q.device, dtype=torch.int32).contiguous()
    lse = lse.to(torch.float32).contiguous()
    block_table = block_table.to(torch.int32).contiguous()
    rows = H if per_query_head else Hkv
    if out is None:
        out = torch.empty(len(stats), rows, seq_len, dtype=torch.float32, device=q.device)
    assert out.shape == (len(stats), rows, seq_len) and out.dtype == torch.float32 and out.stride(-1) == 1
    idx = {s: (stats.index(s) if s in stats else -1) for s in STATISTICS}
    grid = (Hkv, triton.cdiv(seq_len, block_n))
    _window_scores_kernel[grid](
        q, lse, q_pos, k_cache, block_table, out,
        seq_len, W, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), lse.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1),
        G=G, HEAD_DIM=d, BLOCK_D=next_pow2(d), BLOCK_SIZE=bs, BLOCK_N=block_n,
        BLOCK_W=max(16, min(block_w, next_pow2(W))), PER_HEAD=per_query_head,
        I_SUM=idx["sum"], I_MEAN=idx["mean"], I_MAX=idx["max"], I_SQ=idx["sumsq"],
        UPCAST=upcast_dot_operands(), PRECISION=dot_precision(q.dtype),
        num_warps=4,
    )
    return {s: out[i] for i, s in enumerate(stats)}


def window_scores(*args, impl: str = "auto", **kwargs) -> dict[str, torch.Tensor]:
    """Dispatcher: Triton on CUDA (or under ``TRITON_INTERPRET=1``), torch otherwise."""
    q = args[0] if args else kwargs["q"]
    if use_triton(q, impl):
        return triton_window_scores(*args, **kwargs)
    for key in ("block_n", "block_w", "out"):
        kwargs.pop(key, None)
    return torch_window_scores(*args, **kwargs)
