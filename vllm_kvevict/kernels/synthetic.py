"""Random paged caches in the kernels' layout, shared by the tests and the benchmark.

Every slot that no table points at (block 0, unallocated blocks, the other heads' planes of a
compact page, positions before ``tail_start``, slots past a page's length) is filled with NaN
when ``poison=True``, so a kernel reading a slot it must not read produces NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class TwoSegmentCase:
    """One layer's cache with a compact region per KV head and a positional tail per request.

    Shapes: ``k_cache``/``v_cache [num_blocks, Hkv, bs, d]``, ``compact_pages [B, Hkv, P]``
    int32 head-page ids (``block * Hkv + plane``), ``compact_lens [B, Hkv]`` int32,
    ``block_table [B, M]`` int32, ``tail_start``, ``seq_lens [B]`` int32.
    """

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    compact_pages: torch.Tensor
    compact_lens: torch.Tensor
    block_table: torch.Tensor
    tail_start: torch.Tensor
    seq_lens: torch.Tensor

    @property
    def tables(self) -> tuple:
        return (self.compact_pages, self.compact_lens, self.block_table, self.tail_start, self.seq_lens)

    def kv_bytes(self) -> int:
        """Bytes of K and V the decode attention must read."""
        tail_tokens = int((self.seq_lens - self.tail_start).clamp_min(0).sum())
        tokens = int(self.compact_lens.sum()) + tail_tokens * self.k_cache.shape[1]
        return 2 * tokens * self.k_cache.shape[-1] * self.k_cache.element_size()


def make_two_segment_case(
    compact_lens: torch.Tensor,
    tail_starts: Sequence[int],
    seq_lens: Sequence[int],
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    null_tail_blocks: int = 0,
    poison: bool = True,
    generator: Optional[torch.Generator] = None,
) -> TwoSegmentCase:
    """Build a cache whose block ids are a random permutation of ``1 .. num_blocks - 1``.

    The compact head-pages of all (request, head) pairs are the planes of a few shared blocks
    in random order, so a head's pages sit on other heads' planes too.

    Parameters
    ----------
    compact_lens : ``[B, Hkv]`` tokens in each head's compact region (ragged, may be 0).
    tail_starts, seq_lens : per request; the tail is ``tail_start .. seq_len - 1``. Positional
        blocks wholly before ``tail_start`` are null (0), as after compaction.
    null_tail_blocks : per request, this many tail blocks (not the last) are made null.
    poison : NaN in every slot no table points at.
    """
    g = generator
    B, Hkv = compact_lens.shape
    bs = block_size
    cpages_per_head = (compact_lens + bs - 1) // bs
    max_pages = max(1, int(cpages_per_head.max()))
    max_blocks = max(1, max((s + bs - 1) // bs for s in seq_lens))
    n_compact_blocks = (int(cpages_per_head.sum()) + Hkv - 1) // Hkv + 1
    num_blocks = 1 + n_compact_blocks + B * max_blocks + 2  # block 0 is null; 2 spare blocks
    perm = torch.randperm(num_blocks - 1, generator=g) + 1
    compact_blocks, positional_blocks = perm[:n_compact_blocks], perm[n_compact_blocks:]

    # the heads share the planes of the compact blocks, in random order
    head_pages = (compact_blocks.view(-1, 1) * Hkv + torch.arange(Hkv)).flatten()
    head_pages = head_pages[torch.randperm(head_pages.numel(), generator=g)]
    compact_pages = torch.zeros(B, Hkv, max_pages, dtype=torch.int32)
    want = torch.arange(max_pages).view(1, 1, -1) < cpages_per_head.unsqueeze(-1)
    compact_pages[want] = head_pages[: int(want.sum())].to(torch.int32)

    block_table = positional_blocks[: B * max_blocks].view(B, max_blocks).to(torch.int32).clone()
    for b in range(B):
        first_tail = tail_starts[b] // bs
        n_blk = (seq_lens[b] + bs - 1) // bs
        block_table[b, :first_tail] = 0
        block_table[b, n_blk:] = 0
        tail_blocks = list(range(first_tail, n_blk - 1))
        if null_tail_blocks and tail_blocks:
            pick = torch.randperm(len(tail_blocks), generator=g)[:null_tail_blocks]
            for i in pick.tolist():
                block_table[b, tail_blocks[i]] = 0

    shape = (num_blocks, Hkv, bs, head_dim)
    if poison or str(device) == "cpu":
        k = torch.randn(shape, generator=g).to(dtype)
        v = torch.randn(shape, generator=g).to(dtype)
    else:  # large benchmark caches: draw on the device (torch's global generator)
        k = torch.randn(shape, device=device, dtype=dtype)
        v = torch.randn(shape, device=device, dtype=dtype)
    if poison:
        used = torch.zeros(num_blocks, Hkv, bs, dtype=torch.bool)
        # compact: token i of head (b, h) sits in head-page compact_pages[b, h, i // bs], slot i % bs
        i = torch.arange(max_pages * bs)
        live = i.view(1, 1, -1) < compact_lens.view(B, Hkv, 1)
        pages = compact_pages.long().repeat_interleave(bs, dim=-1)[live]
        slots = i.expand(B, Hkv, -1)[live] % bs
        used[pages // Hkv, pages % Hkv, slots] = True
        # tail: positions tail_start .. seq_len - 1 of non-null blocks, every plane
        pos = torch.arange(max_blocks * bs)
        in_tail = (pos.view(1, -1) >= torch.as_tensor(list(tail_starts)).view(-1, 1)) & (
            pos.view(1, -1) < torch.as_tensor(list(seq_lens)).view(-1, 1))
        blocks = block_table.long().repeat_interleave(bs, dim=-1)
        live = in_tail & (blocks > 0)
        used.permute(0, 2, 1)[blocks[live], pos.expand(B, -1)[live] % bs] = True
        k[~used] = float("nan")
        v[~used] = float("nan")
    as_i32 = lambda x: torch.as_tensor(x, dtype=torch.int32)  # noqa: E731
    return TwoSegmentCase(
        k_cache=k.to(device), v_cache=v.to(device),
        compact_pages=compact_pages.to(device), compact_lens=compact_lens.to(torch.int32).to(device),
        block_table=block_table.to(device),
        tail_start=as_i32(list(tail_starts)).to(device), seq_lens=as_i32(list(seq_lens)).to(device),
    )
