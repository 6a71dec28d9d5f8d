"""Compaction: copy the kept (token, KV head) entries of positional blocks into head-pages.

For request ``b`` and KV head ``g``, kept entry ``i`` (``i < kept_lens[b, g]``) is the token at
logical position ``pos = kept_pos[b, g, i]``, read from block ``block_table[b, pos // bs]``,
plane ``g``, slot ``pos % bs``; it is written to head-page ``p = dest_pages[b, g, i // bs]``
(block ``p // Hkv``, plane ``p % Hkv``), slot ``i % bs``, for K and V alike. Nothing else is
written. Destination slots must not alias any source slot of the same call (the plugin
compacts into freshly allocated blocks).
"""

from __future__ import annotations

import torch

from vllm_kvevict.kernels._backend import HAVE_TRITON, next_pow2, use_triton


def torch_compact(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    kept_pos: torch.Tensor,
    kept_lens: torch.Tensor,
    dest_pages: torch.Tensor,
) -> None:
    """Reference, in place.

    Parameters
    ----------
    k_cache, v_cache : ``[num_blocks, Hkv, bs, d]`` one layer.
    block_table : ``[B, max_blocks]`` positional blocks of each request.
    kept_pos : ``[B, Hkv, max_kept]`` logical positions of the kept tokens of each head.
    kept_lens : ``[B, Hkv]`` how many entries of ``kept_pos`` are used.
    dest_pages : ``[B, Hkv, max_pages]`` head-page ids (``block * Hkv + plane``) of each head's
        compact pages (``max_pages * bs >= max_kept``).
    """
    bs = k_cache.shape[2]
    dev = k_cache.device
    B, Hkv, max_kept = kept_pos.shape
    i = torch.arange(max_kept, device=dev)
    mask = i.view(1, 1, -1) < kept_lens.to(dev).long().unsqueeze(-1)  # [B, Hkv, K]
    b_idx, g_idx, i_idx = mask.nonzero(as_tuple=True)
    pos = kept_pos.to(dev).long()[b_idx, g_idx, i_idx]
    src_blk = block_table.to(dev).long()[b_idx, pos // bs]
    dst_page = dest_pages.to(dev).long()[b_idx, g_idx, i_idx // bs]
    for cache in (k_cache, v_cache):
        cache[dst_page // Hkv, dst_page % Hkv, i_idx % bs] = cache[src_blk, g_idx, pos % bs]


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _compact_kernel(k_ptr, v_ptr, btab_ptr, kept_ptr, lens_ptr, dest_ptr,
                        Hkv,
                        stride_kblk, stride_kh, stride_kt,
                        stride_vblk, stride_vh, stride_vt,
                        stride_btb, stride_kpb, stride_kph, stride_lb, stride_dpb, stride_dph,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr):
        bg = tl.program_id(0)
        b = bg // Hkv
        g = bg % Hkv
        i = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        n = tl.load(lens_ptr + b * stride_lb + g)
        ok = i < n
        pos = tl.load(kept_ptr + b * stride_kpb + g * stride_kph + i, mask=ok, other=0)
        src = tl.load(btab_ptr + b * stride_btb + pos // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)
        page = tl.load(dest_ptr + b * stride_dpb + g * stride_dph + i // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)
        dst = page // Hkv
        dst_plane = (page % Hkv)[:, None]
        offs_d = tl.arange(0, BLOCK_D)
        m = ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        src_slot = (pos % BLOCK_SIZE)[:, None]
        dst_slot = (i % BLOCK_SIZE)[:, None]
        d = offs_d[None, :]
        k = tl.load(k_ptr + src[:, None] * stride_kblk + g * stride_kh + src_slot * stride_kt + d, mask=m)
        tl.store(k_ptr + dst[:, None] * stride_kblk + dst_plane * stride_kh + dst_slot * stride_kt + d, k, mask=m)
        v = tl.load(v_ptr + src[:, None] * stride_vblk + g * stride_vh + src_slot * stride_vt + d, mask=m)
        tl.store(v_ptr + dst[:, None] * stride_vblk + dst_plane * stride_vh + dst_slot * stride_vt + d, v, mask=m)


def triton_compact(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    kept_pos: torch.Tensor,
    kept_lens: torch.Tensor,
    dest_pages: torch.Tensor,
    block_t: int = 64,
) -> None:
    """Triton version of :func:`torch_compact` (in place, same arguments)."""
    B, Hkv, max_kept = kept_pos.shape
    d, bs = k_cache.shape[3], k_cache.shape[2]
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    if B == 0 or max_kept == 0:
        return
    block_table = block_table.to(torch.int32).contiguous()
    kept_pos = kept_pos.to(torch.int32).contiguous()
    kept_lens = kept_lens.to(torch.int32).contiguous()
    dest_pages = dest_pages.to(torch.int32).contiguous()
    grid = (B * Hkv, triton.cdiv(max_kept, block_t))
    _compact_kernel[grid](k_cache, v_cache, block_table, kept_pos, kept_lens, dest_pages,
                          Hkv,
                          k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                          v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
                          block_table.stride(0), kept_pos.stride(0), kept_pos.stride(1), kept_lens.stride(0),
                          dest_pages.stride(0), dest_pages.stride(1),
                          HEAD_DIM=d, BLOCK_D=next_pow2(d), BLOCK_SIZE=bs, BLOCK_T=block_t)


def compact(k_cache, v_cache, block_table, kept_pos, kept_lens, dest_pages, impl: str = "auto") -> None:
    """Dispatcher: Triton on CUDA (or under ``TRITON_INTERPRET=1``), torch otherwise."""
    if use_triton(k_cache, impl):
        triton_compact(k_cache, v_cache, block_table, kept_pos, kept_lens, dest_pages)
    else:
        torch_compact(k_cache, v_cache, block_table, kept_pos, kept_lens, dest_pages)
