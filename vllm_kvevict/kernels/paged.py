"""Torch gathers from the paged cache (layout in :mod:`vllm_kvevict.kernels`).

These are the reading half of every torch reference: they turn page tables into dense,
masked token tensors. Block ids ``<= 0`` in the positional block table are null blocks;
compact page tables hold head-page ids ``block * Hkv + plane``.
"""

from __future__ import annotations

import torch


def head_page_ids(block_ids: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Head-page ids of ``block_ids [B, Hkv, P]`` when head ``g`` uses plane ``g`` of each block."""
    planes = torch.arange(num_kv_heads, device=block_ids.device, dtype=block_ids.dtype).view(1, -1, 1)
    return block_ids * num_kv_heads + planes


def gather_two_segment(
    cache: torch.Tensor,
    compact_pages: torch.Tensor,
    compact_lens: torch.Tensor,
    block_table: torch.Tensor,
    tail_start: torch.Tensor,
    seq_lens: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens of every (request, KV head): compact pages first, then the positional tail.

    Parameters
    ----------
    cache : ``[num_blocks, Hkv, block_size, d]`` one layer's K (or V).
    compact_pages : ``[B, Hkv, max_pages]`` int head-page ids (``block * Hkv + plane``) of each
        head's compact pages.
    compact_lens : ``[B, Hkv]`` tokens in each head's compact region.
    block_table : ``[B, max_blocks]`` positional blocks; ids ``<= 0`` are null (skipped).
    tail_start, seq_lens : ``[B]`` the tail covers positions ``tail_start .. seq_lens - 1``.

    Returns
    -------
    tokens : ``[B, Hkv, Tc + Tt, d]`` (same dtype as ``cache``), ``Tc = max compact_lens``,
        ``Tt = max(seq_lens - tail_start)``; invalid slots are zeros.
    valid : ``[B, Hkv, Tc + Tt]`` bool.
    """
    bs = cache.shape[2]
    dev = cache.device
    B, Hkv = compact_lens.shape
    lens = compact_lens.long().to(dev)
    t_c = int(lens.max()) if lens.numel() else 0
    tail_len = (seq_lens.long() - tail_start.long()).clamp_min(0).to(dev)
    t_t = int(tail_len.max()) if tail_len.numel() else 0
    heads = torch.arange(Hkv, device=dev).view(1, Hkv, 1)
    assert cache.shape[1] == Hkv

    i = torch.arange(t_c, device=dev)
    c_valid = i.view(1, 1, -1) < lens.unsqueeze(-1)  # [B, Hkv, Tc]
    page_idx = (i // bs).clamp_max(max(compact_pages.shape[-1] - 1, 0))
    if t_c:
        c_page = compact_pages.long().to(dev)[:, :, page_idx]
    else:
        c_page = torch.zeros(B, Hkv, 0, dtype=torch.long, device=dev)
    c_page = torch.where(c_valid, c_page, 0)
    c_blk, c_plane = c_page // Hkv, c_page % Hkv
    c_slot = (i % bs).view(1, 1, -1).expand(B, Hkv, t_c)

    j = torch.arange(t_t, device=dev)
    pos = tail_start.long().to(dev).view(B, 1) + j.view(1, -1)  # [B, Tt]
    in_tail = pos < seq_lens.long().to(dev).view(B, 1)
    blk_idx = (pos // bs).clamp_max(block_table.shape[1] - 1)
    t_blk = torch.gather(block_table.long().to(dev), 1, blk_idx)
    t_valid = in_tail & (t_blk > 0)
    t_blk = torch.where(t_valid, t_blk, 0)
    t_valid = t_valid.unsqueeze(1).expand(B, Hkv, t_t)
    t_blk = t_blk.unsqueeze(1).expand(B, Hkv, t_t)
    t_slot = (pos % bs).unsqueeze(1).expand(B, Hkv, t_t)
    t_plane = heads.expand(B, Hkv, t_t)

    blk = torch.cat([c_blk, t_blk], dim=2)
    plane = torch.cat([c_plane, t_plane], dim=2)
    slot = torch.cat([c_slot, t_slot], dim=2)
    valid = torch.cat([c_valid, t_valid], dim=2)
    tokens = cache[blk, plane, slot].masked_fill(~valid.unsqueeze(-1), 0)
    return tokens, valid


def gather_positional(cache: torch.Tensor, block_table: torch.Tensor,
                      seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One request's positions ``0 .. seq_len - 1`` as ``[Hkv, seq_len, d]`` plus ``valid [seq_len]``.

    ``block_table`` is the request's row ``[max_blocks]``; slots of null blocks are not valid
    (and read as zeros).
    """
    bs = cache.shape[2]
    pos = torch.arange(seq_len, device=cache.device)
    blk = block_table.long().to(cache.device)[pos // bs]
    valid = blk > 0
    blk = torch.where(valid, blk, 0)
    tokens = cache[blk, :, pos % bs].masked_fill(~valid.view(-1, 1, 1), 0)
    return tokens.transpose(0, 1), valid
