"""VECTOR's key-only tokens in the two-segment decode kernel: one more split, merged by its reduce.

A head's compact segment is its ``W`` whole tokens (``compact_lens``), then its key-only tokens
two to a slot (docs/VECTOR.md): key-only token ``j`` is in the head's slot ``W + j // 2`` of
its compact pages, its key in ``k_cache`` when ``j`` is even and in ``v_cache`` (the slot's V
half) when it is odd. Its value is rebuilt from that key: ``[k', 1] @ weight[g]``, ``k'`` the key
with RoPE undone at its position where ``derotate[g]`` (HF ``rotate_half`` convention,
:func:`vllm_kvevict.lkv.nets.unrotate_keys`), else the cached key; the same maths as
:meth:`vllm_kvevict.vector.VectorArtifact.reconstruct`.

:func:`~vllm_kvevict.kernels.decode_attention.triton_paged_decode_attention` given a
:class:`KeyOnlySegment` runs its whole-token splits as before plus one program per (request,
KV head) here over the key-only tokens (``W`` and the frequencies loaded once per program),
written as the last split of its partial results; the reduce kernel merges them all.
:meth:`KeyOnlySegment.gather` is its torch reference (the same tokens, dense and masked), which
:func:`~vllm_kvevict.kernels.decode_attention.torch_paged_decode_attention` appends to each
head's tokens. The CUDA backends pass one per layer (``vllm/backends/head_batch.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvevict.kernels._backend import HAVE_TRITON, next_pow2
from vllm_kvevict.vector.artifact import rebuilt_values


@dataclass
class KeyOnlySegment:
    """One layer's key-only tokens of a batch: ``lens [B, Hkv]`` (even), ``positions [B, Hkv, M]``
    int32 (position of key-only token ``j`` of each head), the layer's ``weight [Hkv, d + 1, d]``
    float32, ``derotate [Hkv]`` bool, RoPE's ``inv_freq [d / 2]`` and ``rope_scaling``."""

    lens: torch.Tensor
    positions: torch.Tensor
    weight: torch.Tensor
    derotate: torch.Tensor
    inv_freq: torch.Tensor
    rope_scaling: float = 1.0

    def gather(self, k_cache: torch.Tensor, v_cache: torch.Tensor, compact_pages: torch.Tensor,
               compact_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The torch reference of the kernel's reads: ``(keys, values, valid)``, ``[B, Hkv, M, d]``
        float32 (values rebuilt) and ``[B, Hkv, M]`` bool; invalid tokens are zeros."""
        dev = k_cache.device
        Hkv, bs = k_cache.shape[1], k_cache.shape[2]
        lens = self.lens.to(dev, torch.int64)
        positions = self.positions.to(dev, torch.int64)
        j = torch.arange(positions.shape[-1], device=dev)
        valid = j < lens[..., None]
        seg = compact_lens.to(dev, torch.int64)[..., None] + j // 2  # the head's slot of token j
        pages = compact_pages.to(dev, torch.int64)
        page = pages.gather(-1, (seg // bs).clamp(0, max(pages.shape[-1] - 1, 0)))
        page = torch.where(valid, page, 0)
        block, plane, slot = page // Hkv, page % Hkv, seg % bs
        in_k = (j % 2 == 0)[..., None]
        keys = torch.where(in_k, k_cache[block, plane, slot], v_cache[block, plane, slot]).float()
        keys = keys.masked_fill(~valid[..., None], 0.0)
        values = rebuilt_values(keys, positions, self.weight.to(dev, torch.float32), self.derotate.to(dev, torch.bool),
                                self.inv_freq.to(dev), float(self.rope_scaling))
        return keys, values.masked_fill(~valid[..., None], 0.0), valid

    def launch(self, q, k_cache, v_cache, compact_pages, compact_lens, part_o, part_lse, split_index: int,
               scale_log2: float, block_n: int, num_warps: int) -> None:
        """Write split ``split_index`` of ``part_o [B, H, S, d]`` / ``part_lse [B, H, S]`` (float32
        products throughout: the rebuilt values are float32, as the reference's)."""
        B, H, d = q.shape
        Hkv, bs = k_cache.shape[1], k_cache.shape[2]
        lens = self.lens.to(device=q.device, dtype=torch.int32).contiguous()
        positions = self.positions.to(device=q.device, dtype=torch.int32).contiguous()
        weight = self.weight.to(device=q.device, dtype=torch.float32).contiguous()
        derotate = self.derotate.to(device=q.device, dtype=torch.int32).contiguous()
        inv_freq = self.inv_freq.to(device=q.device, dtype=torch.float32).contiguous()
        _key_only_kernel[(B, Hkv)](
            q, k_cache, v_cache, compact_pages, compact_lens, lens, positions, weight, derotate, inv_freq,
            part_o, part_lse, scale_log2, float(self.rope_scaling), split_index,
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            compact_pages.stride(0), compact_pages.stride(1), compact_lens.stride(0),
            lens.stride(0), positions.stride(0), positions.stride(1), weight.stride(0), weight.stride(1),
            part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
            G=H // Hkv, BLOCK_G=max(16, next_pow2(H // Hkv)), num_kv_heads=Hkv, HEAD_DIM=d, BLOCK_D=next_pow2(d),
            BLOCK_SIZE=bs, BLOCK_N=block_n, num_warps=num_warps,
        )


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _key_only_kernel(
        q_ptr, k_ptr, v_ptr, cpages_ptr, clens_ptr, kolens_ptr, kopos_ptr, w_ptr, derot_ptr, freq_ptr,
        part_o_ptr, part_lse_ptr, scale_log2, rope_scaling, split_index,
        stride_qb, stride_qh,
        stride_kblk, stride_kh, stride_kt,
        stride_vblk, stride_vh, stride_vt,
        stride_cpb, stride_cph, stride_clb,
        stride_kob, stride_kopb, stride_koph, stride_wh, stride_wr,
        stride_pob, stride_poh, stride_pos, stride_plb, stride_plh,
        G: tl.constexpr, BLOCK_G: tl.constexpr, num_kv_heads: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        b = tl.program_id(0)
        g = tl.program_id(1)
        HALF: tl.constexpr = HEAD_DIM // 2
        clen = tl.load(clens_ptr + b * stride_clb + g)
        nko = tl.load(kolens_ptr + b * stride_kob + g)

        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        g_mask = offs_g < G
        d_mask = offs_d < HEAD_DIM
        heads = g * G + offs_g
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        w_base = w_ptr + g * stride_wh
        w = tl.load(w_base + offs_d[:, None] * stride_wr + offs_d[None, :], mask=d_mask[:, None] & d_mask[None, :],
                    other=0.0)
        bias = tl.load(w_base + HEAD_DIM * stride_wr + offs_d, mask=d_mask, other=0.0)
        derotate = tl.load(derot_ptr + g) != 0
        partner = (offs_d + HALF) % HEAD_DIM  # rotate_half(k)[i] = sign[i] * k[partner[i]]
        sign = tl.where(offs_d < HALF, -1.0, 1.0)
        freq = tl.load(freq_ptr + offs_d % HALF, mask=d_mask, other=0.0)

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        cp_base = cpages_ptr + b * stride_cpb + g * stride_cph
        for start in range(0, nko, BLOCK_N):
            j = start + offs_n
            valid = j < nko
            seg = clen + j // 2  # the head's slot holding key-only token j
            page = tl.load(cp_base + seg // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
            blk = page // num_kv_heads
            plane = page % num_kv_heads
            slot = seg % BLOCK_SIZE
            in_k = (valid & (j % 2 == 0))[:, None] & d_mask[None, :]
            in_v = (valid & (j % 2 == 1))[:, None] & d_mask[None, :]
            k_row = (k_ptr + blk * stride_kblk + plane * stride_kh + slot * stride_kt)[:, None]
            v_row = (v_ptr + blk * stride_vblk + plane * stride_vh + slot * stride_vt)[:, None]
            key = (tl.load(k_row + offs_d[None, :], mask=in_k, other=0.0).to(tl.float32)
                   + tl.load(v_row + offs_d[None, :], mask=in_v, other=0.0).to(tl.float32))
            mate = (tl.load(k_row + partner[None, :], mask=in_k, other=0.0).to(tl.float32)
                    + tl.load(v_row + partner[None, :], mask=in_v, other=0.0).to(tl.float32))
            pos = tl.load(kopos_ptr + b * stride_kopb + g * stride_koph + j, mask=valid, other=0).to(tl.float32)
            angle = pos[:, None] * freq[None, :]
            plain = (key * tl.cos(angle) - sign[None, :] * mate * tl.sin(angle)) / rope_scaling
            x = tl.where(derotate, plain, key)
            vhat = tl.dot(x, w, input_precision="ieee") + bias[None, :]

            logits = tl.dot(q, tl.trans(key), input_precision="ieee") * scale_log2
            logits = tl.where(valid[None, :], logits, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(logits, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(logits - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p, vhat, input_precision="ieee")
            m_i = m_new

        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        lse2 = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(part_o_ptr + b * stride_pob + heads[:, None] * stride_poh + split_index * stride_pos
                 + offs_d[None, :], out, mask=g_mask[:, None] & d_mask[None, :])
        tl.store(part_lse_ptr + b * stride_plb + heads * stride_plh + split_index, lse2, mask=g_mask)
