"""Value norms through the output projection: Triton (interpreted on CPU) against the torch
reference, and the reference against an explicit per-head ``v @ Wo[h]^T``."""

import pytest
import torch
from kernel_checks import DEVICE, KV_HEADS, SCALE, TOL, rel_err

from vllm_kvevict.kernels import gram_factor, head_gram, torch_value_norms, triton_value_norms, value_norms


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_triton_matches_torch_reference(group, head_dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    Hkv = KV_HEADS
    H = Hkv * group
    N = int(torch.randint(1, 50 * SCALE, (1,), generator=gen))
    D = 80 * SCALE + 16 * (SCALE > 1)  # not a multiple of the Wo tile: the last tile is masked
    values = torch.randn(N, Hkv, head_dim, generator=gen).to(dtype).to(DEVICE)
    o_proj = (torch.randn(D, H * head_dim, generator=gen) / head_dim ** 0.5).to(dtype).to(DEVICE)
    gram = head_gram(o_proj, H)
    for p, extra in ((1, {}), (2, {"gram": gram}), (2, {"factor": gram_factor(gram)})):
        ref = torch_value_norms(values, o_proj, H, p=p)
        out = torch.full((N, H), float("nan"), device=DEVICE)
        triton_value_norms(values, o_proj, H, p=p, block_e=32, out=out, **extra)
        assert not out.isnan().any(), f"seed={seed} p={p}: unwritten or NaN output"
        err = rel_err(out, ref)
        assert err < TOL[dtype], f"seed={seed} p={p} {list(extra)}: relative error {err:.2e}"


def test_reference_matches_explicit_projection(seed):
    gen = torch.Generator().manual_seed(seed)
    N, Hkv, G, d, D = 7, 2, 3, 16, 40
    H = Hkv * G
    values = torch.randn(N, Hkv, d, generator=gen, dtype=torch.float64)
    o_proj = torch.randn(D, H * d, generator=gen, dtype=torch.float64)
    for h in range(H):
        proj = values[:, h // G] @ o_proj[:, h * d:(h + 1) * d].T  # [N, D], materialised on purpose
        torch.testing.assert_close(torch_value_norms(values, o_proj, H, p=1)[:, h], proj.abs().sum(1).float())
        torch.testing.assert_close(torch_value_norms(values, o_proj, H, p=2)[:, h], proj.norm(dim=1).float())
    gram = head_gram(o_proj, H)
    gram_path = value_norms(values.float(), o_proj.float(), H, p=2, gram=gram, impl="torch")
    torch.testing.assert_close(gram_path, torch_value_norms(values, o_proj, H, p=2), rtol=1e-4, atol=1e-4)
    factor = gram_factor(gram)
    torch.testing.assert_close(factor @ factor.transpose(1, 2), gram.float(), rtol=1e-4, atol=1e-4)
    factor_path = value_norms(values.float(), o_proj.float(), H, p=2, factor=factor, impl="torch")
    torch.testing.assert_close(factor_path, torch_value_norms(values, o_proj, H, p=2), rtol=1e-4, atol=1e-4)


def test_dispatcher_uses_triton_under_the_interpreter(seed):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(20, 2, 32, generator=gen)
    o_proj = torch.randn(48, 4 * 32, generator=gen)
    auto = value_norms(values, o_proj, 4, p=1)
    assert rel_err(auto, torch_value_norms(values, o_proj, 4, p=1)) < 1e-5
    with pytest.raises(ValueError):
        triton_value_norms(values, o_proj, 4, p=3)
