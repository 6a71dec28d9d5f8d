"""Compaction into head-pages: Triton (interpreted on CPU) against the torch reference, and
both against an entry-by-entry copy."""

import pytest
import torch
from kernel_checks import DEVICE, SCALE

from vllm_kvevict.kernels import compact, torch_compact, triton_compact


def random_compaction(gen, B, Hkv, d, bs, dtype, scale=1):
    """Positional blocks holding each request's tokens (up to ``4 * bs * scale``), kept subsets
    ragged per head (0 and 1 included), destination head-pages: the planes of fresh NaN blocks,
    in random order."""
    seq_lens = torch.randint(1, 4 * bs * scale, (B,), generator=gen).tolist()
    n_blk = [(s + bs - 1) // bs for s in seq_lens]
    kept_lens = torch.stack([torch.randint(0, s + 1, (Hkv,), generator=gen) for s in seq_lens])
    kept_lens[0, 0] = 0
    kept_lens[-1, -1] = min(1, seq_lens[-1])
    max_kept = max(1, int(kept_lens.max()))
    max_pages = (max_kept + bs - 1) // bs
    n_fresh = (B * Hkv * max_pages + Hkv - 1) // Hkv
    num_blocks = 1 + sum(n_blk) + n_fresh + 2
    ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    block_table = torch.zeros(B, max(n_blk), dtype=torch.int32)
    kept_pos = torch.zeros(B, Hkv, max_kept, dtype=torch.int64)
    for b in range(B):
        for j in range(n_blk[b]):
            block_table[b, j] = ids.pop()
        for g in range(Hkv):
            n = int(kept_lens[b, g])
            kept_pos[b, g, :n] = torch.randperm(seq_lens[b], generator=gen)[:n].sort().values
    fresh = torch.tensor(ids[:n_fresh])
    planes = (fresh.view(-1, 1) * Hkv + torch.arange(Hkv)).flatten()
    planes = planes[torch.randperm(planes.numel(), generator=gen)]
    dest_pages = planes[: B * Hkv * max_pages].to(torch.int32).view(B, Hkv, max_pages)
    k = torch.randn(num_blocks, Hkv, bs, d, generator=gen).to(dtype)
    v = torch.randn(num_blocks, Hkv, bs, d, generator=gen).to(dtype)
    k[fresh] = float("nan")
    v[fresh] = float("nan")
    return k, v, block_table, kept_pos, kept_lens, dest_pages


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_triton_matches_torch_and_copies_exactly(head_dim, block_size, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    B, Hkv = (3, 4) if SCALE == 1 else (8, 8)
    k, v, table, kept_pos, kept_lens, dest = random_compaction(gen, B, Hkv, head_dim, block_size, dtype, SCALE)
    on = [x.to(DEVICE) for x in (table, kept_pos, kept_lens, dest)]
    k_ref, v_ref = k.to(DEVICE), v.to(DEVICE)
    torch_compact(k_ref, v_ref, *on)
    k_tri, v_tri = k.to(DEVICE), v.to(DEVICE)
    triton_compact(k_tri, v_tri, *on, block_t=32)
    torch.testing.assert_close(k_tri, k_ref, rtol=0, atol=0, equal_nan=True, msg=f"seed={seed}")
    torch.testing.assert_close(v_tri, v_ref, rtol=0, atol=0, equal_nan=True, msg=f"seed={seed}")
    k_tri, v_tri = k_tri.cpu(), v_tri.cpu()  # the entry-by-entry check below runs on CPU
    bs = block_size
    written = torch.zeros(k.shape[:3], dtype=torch.bool)
    for b in range(B):
        for g in range(Hkv):
            for i in range(int(kept_lens[b, g])):
                pos = int(kept_pos[b, g, i])
                page = int(dest[b, g, i // bs])
                src = (int(table[b, pos // bs]), g, pos % bs)
                dst = (page // Hkv, page % Hkv, i % bs)
                assert torch.equal(k_tri[dst], k[src]) and torch.equal(v_tri[dst], v[src]), f"seed={seed}"
                written[dst] = True
    # every slot not written to is as before (NaN slots of fresh blocks stay NaN)
    for before, after in ((k, k_tri), (v, v_tri)):
        torch.testing.assert_close(after[~written], before[~written], rtol=0, atol=0, equal_nan=True)
    assert int(written.sum()) == int(kept_lens.sum())


def test_dispatcher_and_empty_batch(seed):
    gen = torch.Generator().manual_seed(seed)
    k, v, table, kept_pos, kept_lens, dest = random_compaction(gen, 2, 2, 32, 16, torch.float32)
    k1, v1, k2, v2 = k.clone(), v.clone(), k.clone(), v.clone()
    compact(k1, v1, table, kept_pos, kept_lens, dest)
    compact(k2, v2, table, kept_pos, kept_lens, dest, impl="torch")
    torch.testing.assert_close(k1, k2, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v1, v2, rtol=0, atol=0, equal_nan=True)
    compact(k1, v1, table[:0], kept_pos[:0], kept_lens[:0], dest[:0])  # nothing to do, no error
