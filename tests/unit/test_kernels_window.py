"""Window scoring and score pooling: Triton (interpreted on CPU) against the torch references,
and the references against a dense causal softmax over the gathered keys."""

import random

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import DEVICE, KV_HEADS, SCALE, TOL, rel_err

from vllm_kvevict.kernels import (
    STATISTICS,
    gather_positional,
    pool_scores,
    torch_pool_scores,
    torch_window_lse,
    torch_window_scores,
    triton_pool_scores,
    triton_window_lse,
    triton_window_scores,
    window_lse,
    window_scores,
)
from vllm_kvevict.kernels.synthetic import make_two_segment_case


def positional_request(gen, Hkv, d, bs, dtype, seq_len, null_blocks=1, device="cpu"):
    """One request, every token positional (as in the last prefill chunk), some null blocks."""
    case = make_two_segment_case(torch.zeros(1, Hkv, dtype=torch.long), [0], [seq_len], d, bs, dtype,
                                 device=device, null_tail_blocks=null_blocks, generator=gen)
    return case.k_cache, case.block_table[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_triton_matches_torch_reference(group, head_dim, block_size, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    Hkv = KV_HEADS
    seq_len = int(torch.randint(block_size + 1, 3 * block_size * SCALE, (1,), generator=gen))
    W = int(torch.randint(1, 20, (1,), generator=gen)) if SCALE == 1 else 32
    k_cache, table = positional_request(gen, Hkv, head_dim, block_size, dtype, seq_len, device=DEVICE)
    q = torch.randn(W, Hkv * group, head_dim, generator=gen).to(dtype).to(DEVICE)
    lse = torch_window_lse(q, k_cache, table, seq_len)
    assert not lse.isnan().any(), f"seed={seed}"  # -inf where a row sees only null blocks
    lse_triton = triton_window_lse(q, k_cache, table, seq_len, block_n=32)
    torch.testing.assert_close(lse_triton, lse, rtol=0, atol=1e-4 if dtype == torch.float32 else 2e-2,
                               msg=f"seed={seed}")
    stats = list(STATISTICS)
    random.Random(seed).shuffle(stats)
    for per_head in (False, True):
        ref = torch_window_scores(q, lse, k_cache, table, seq_len, stats=stats, per_query_head=per_head)
        rows = Hkv * group if per_head else Hkv
        out = torch.full((len(stats), rows, seq_len), float("nan"), device=DEVICE)
        got = triton_window_scores(q, lse, k_cache, table, seq_len, stats=stats, per_query_head=per_head, out=out)
        assert not out.isnan().any(), f"seed={seed}: unwritten or NaN output"
        for name in stats:
            assert got[name].shape == (rows, seq_len)
            err = rel_err(got[name], ref[name])
            assert err < TOL[dtype], f"seed={seed} {name} per_head={per_head}: relative error {err:.2e}"


def test_reference_matches_dense_causal_softmax(seed):
    gen = torch.Generator().manual_seed(seed)
    Hkv, G, d, bs, L, W = 2, 3, 32, 16, 70, 9
    k_cache, table = positional_request(gen, Hkv, d, bs, torch.float32, L, null_blocks=0)
    q = torch.randn(W, Hkv * G, d, generator=gen)
    keys, _ = gather_positional(k_cache, table, L)  # [Hkv, L, d]
    logits = torch.einsum("whd,htd->hwt", q, keys.repeat_interleave(G, 0)) / d ** 0.5
    causal = torch.arange(L).view(1, -1) > torch.arange(L - W, L).view(-1, 1)
    attn = torch.softmax(logits.masked_fill(causal, float("-inf")), dim=-1)  # [H, W, L]
    lse = torch_window_lse(q, k_cache, table, L, chunk=32)  # chunked on purpose
    torch.testing.assert_close(lse, torch.logsumexp(logits.masked_fill(causal, float("-inf")), -1))
    torch.testing.assert_close(window_lse(q, k_cache, table, L), lse)  # Triton under the interpreter
    ref = torch_window_scores(q, lse, k_cache, table, L, stats=STATISTICS)
    grouped = attn.view(Hkv, G * W, L)
    torch.testing.assert_close(ref["mean"], grouped.mean(1))
    torch.testing.assert_close(ref["sum"], grouped.sum(1))
    torch.testing.assert_close(ref["max"], grouped.amax(1))
    torch.testing.assert_close(ref["sumsq"], (grouped ** 2).sum(1))
    per_head = torch_window_scores(q, lse, k_cache, table, L, stats=("mean",), per_query_head=True)
    torch.testing.assert_close(per_head["mean"], attn.mean(1))
    # the window's causal mask: the last position is seen by the last row only
    torch.testing.assert_close(ref["max"][:, -1], attn[:, -1, -1].view(Hkv, G).amax(1))


def test_dispatcher_and_null_blocks(seed):
    gen = torch.Generator().manual_seed(seed)
    Hkv, d, bs, L = 2, 64, 16, 80
    k_cache, table = positional_request(gen, Hkv, d, bs, torch.float32, L, null_blocks=2)
    q = torch.randn(4, 4, d, generator=gen)
    lse = window_lse(q, k_cache, table, L)
    auto = window_scores(q, lse, k_cache, table, L, stats=("max",))
    ref = window_scores(q, lse, k_cache, table, L, stats=("max",), impl="torch")
    assert rel_err(auto["max"], ref["max"]) < 1e-5
    null_tokens = (table.repeat_interleave(bs)[:L] <= 0)
    assert null_tokens.sum() == 2 * bs
    assert torch.equal(auto["max"][:, null_tokens], torch.zeros(Hkv, 2 * bs))


@pytest.mark.parametrize("kind", ["avg", "max"])
@pytest.mark.parametrize("kernel_size", [1, 3, 5, 7])
def test_pooling_matches_torch(kind, kernel_size, seed):
    gen = torch.Generator().manual_seed(seed)
    for L in (3, 50, 300 * SCALE):
        x = torch.rand(3, L, generator=gen).to(DEVICE)
        ref = torch_pool_scores(x, kind, kernel_size)
        out = torch.full((3, L), float("nan"), device=DEVICE)
        triton_pool_scores(x, kind, kernel_size, block=128, out=out)
        assert not out.isnan().any(), f"seed={seed}"
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7, msg=f"seed={seed} L={L}")
    assert torch.equal(pool_scores(x, kind, kernel_size, impl="torch"), ref)


def test_pooling_is_snapkv_pooling(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 33, generator=gen)
    expected = F.avg_pool1d(x.unsqueeze(1), 5, stride=1, padding=2, count_include_pad=True).squeeze(1)
    torch.testing.assert_close(torch_pool_scores(x, "avg", 5), expected)
    manual = torch.stack([x[:, max(0, j - 2):j + 3].sum(1) / 5 for j in range(33)], dim=1)
    torch.testing.assert_close(torch_pool_scores(x, "avg", 5), manual)
    with pytest.raises(ValueError):
        torch_pool_scores(x, "avg", 4)
