"""Two-segment paged decode attention: Triton (interpreted on CPU) against the torch reference,
and the torch reference against dense softmax attention over explicitly gathered tokens."""

import pytest
import torch
from kernel_checks import DEVICE, KV_HEADS, SCALE, TOL, rel_err

from vllm_kvevict.kernels import paged_decode_attention, torch_paged_decode_attention, triton_paged_decode_attention
from vllm_kvevict.kernels.synthetic import make_two_segment_case


def random_case(gen: torch.Generator, Hkv: int, d: int, bs: int, dtype, B: int = 3, scale: int = 1,
                device: str = "cpu"):
    """Ragged compact lengths (forced to include 0 and 1), unaligned tails, one null tail block;
    lengths up to ``3 * bs * scale`` (compact) and ``4 * bs * scale`` (tail)."""
    compact_lens = torch.randint(0, 3 * bs * scale, (B, Hkv), generator=gen)
    compact_lens[0, 0] = 0
    compact_lens[-1, -1] = 1
    tail_starts, seq_lens = [], []
    for b in range(B):
        start = int(torch.randint(0, 3 * bs * scale, (1,), generator=gen))
        length = 1 if b == 0 else int(torch.randint(1, 4 * bs * scale, (1,), generator=gen))
        tail_starts.append(start)
        seq_lens.append(start + length)
    return make_two_segment_case(compact_lens, tail_starts, seq_lens, d, bs, dtype, device=device, null_tail_blocks=1,
                                 generator=gen)


def dense_reference(q, case, scale):
    """Independent check: walk the tables token by token, then plain softmax attention."""
    B, H, d = q.shape
    Hkv, bs = case.k_cache.shape[1], case.k_cache.shape[2]
    G = H // Hkv
    out = torch.zeros(B, H, d)
    for b in range(B):
        for g in range(Hkv):
            slots = []  # (block, plane, slot) of every token of head g, compact pages first
            for i in range(int(case.compact_lens[b, g])):
                page = int(case.compact_pages[b, g, i // bs])
                slots.append((page // Hkv, page % Hkv, i % bs))
            for pos in range(int(case.tail_start[b]), int(case.seq_lens[b])):
                blk = int(case.block_table[b, pos // bs])
                if blk > 0:
                    slots.append((blk, g, pos % bs))
            if not slots:
                continue
            k = torch.stack([case.k_cache[s] for s in slots]).float()
            v = torch.stack([case.v_cache[s] for s in slots]).float()
            qh = q[b, g * G:(g + 1) * G].float()
            out[b, g * G:(g + 1) * G] = torch.softmax(qh @ k.T * scale, dim=-1) @ v
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_triton_matches_torch_reference(group, head_dim, block_size, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    Hkv = KV_HEADS
    case = random_case(gen, Hkv, head_dim, block_size, dtype, B=3 if SCALE == 1 else 8, scale=SCALE, device=DEVICE)
    q = torch.randn(case.compact_lens.shape[0], Hkv * group, head_dim, generator=gen).to(dtype).to(DEVICE)
    ref = torch_paged_decode_attention(q, case.k_cache, case.v_cache, *case.tables)
    assert not ref.isnan().any(), f"seed={seed}"
    # crossed with every dtype, group and head dim; at full size block 32 takes the default split
    splits = 1 if block_size == 16 else (3 if SCALE == 1 else None)
    out = torch.full_like(q, float("nan"))
    triton_paged_decode_attention(q, case.k_cache, case.v_cache, *case.tables, num_splits=splits, out=out)
    assert not out.isnan().any(), f"seed={seed} splits={splits}: unwritten or NaN output"
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"seed={seed} splits={splits}: relative error {err:.2e}"


@pytest.mark.parametrize("group", [1, 4])
def test_torch_reference_matches_dense_attention(group, seed):
    gen = torch.Generator().manual_seed(seed)
    Hkv, d, bs = 3, 32, 16
    case = random_case(gen, Hkv, d, bs, torch.float32, B=4)
    q = torch.randn(4, Hkv * group, d, generator=gen)
    scale = 0.3
    ref = torch_paged_decode_attention(q, case.k_cache, case.v_cache, *case.tables, scale=scale)
    dense = dense_reference(q, case, scale)
    assert rel_err(ref, dense) < 1e-5, f"seed={seed}"


def test_head_without_tokens_gives_zeros_and_dispatcher_picks_triton(seed):
    gen = torch.Generator().manual_seed(seed)
    d, bs = 64, 16
    # both tails empty; request 0 head 0 has no token at all, request 1 head 1 exactly one
    case = make_two_segment_case(torch.tensor([[0, 5], [7, 1]]), [20, 3], [20, 3], d, bs, device=DEVICE,
                                 generator=gen)
    q = torch.randn(2, 4, d, generator=gen).to(DEVICE)
    ref = torch_paged_decode_attention(q, case.k_cache, case.v_cache, *case.tables)
    out = torch.full_like(q, float("nan"))
    paged_decode_attention(q, case.k_cache, case.v_cache, *case.tables, num_splits=2, out=out)  # auto: Triton here
    zeros = torch.zeros(2, d, device=DEVICE)
    assert torch.equal(out[0, :2], zeros) and torch.equal(ref[0, :2], zeros)
    assert rel_err(out, ref) < TOL[torch.float32], f"seed={seed}"
    # one token only: the output is that token's value, exactly
    page = int(case.compact_pages[1, 1, 0])
    v_only = case.v_cache[page // 2, page % 2, 0]
    torch.testing.assert_close(out[1, 2:], v_only.expand(2, d), rtol=1e-6, atol=1e-6)
    torch_out = paged_decode_attention(q, case.k_cache, case.v_cache, *case.tables, impl="torch", num_splits=2)
    assert torch.equal(torch_out, ref)


def test_strided_cache_views(seed):
    """A stacked ``[2, num_blocks, ...]`` cache and vLLM GPU's ``[num_blocks, bs, Hkv, d]``
    layout (through a transposed view) give the same result as the contiguous cache."""
    gen = torch.Generator().manual_seed(seed)
    case = make_two_segment_case(torch.tensor([[3, 20], [0, 17]]), [5, 16], [40, 33], 32, 16, device=DEVICE,
                                 generator=gen)
    q = torch.randn(2, 4, 32, generator=gen).to(DEVICE)
    ref = torch_paged_decode_attention(q, case.k_cache, case.v_cache, *case.tables)
    kv = torch.stack([case.k_cache, case.v_cache])
    nhd = [c.transpose(1, 2).contiguous().transpose(1, 2) for c in (case.k_cache, case.v_cache)]
    for k, v in ((kv[0], kv[1]), nhd):
        out = torch.full_like(q, float("nan"))
        triton_paged_decode_attention(q, k, v, *case.tables, num_splits=2, out=out)
        assert rel_err(out, ref) < TOL[torch.float32], f"seed={seed}"
