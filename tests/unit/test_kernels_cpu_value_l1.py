"""The C++ value-norm kernel (csrc/value_l1.cpp) against the torch definition (issue 14).

The kernel must be built wherever the set-up ran (scripts/setup.sh builds it; CI runs that on a
fresh clone), so a missing kernel FAILS here rather than skipping: the served path would silently
run torch. Every instruction-set path this CPU supports is compared with the definition in
float64 (kvpress's ``vwl1norm`` written out), on odd shapes and non-contiguous inputs.
"""

from __future__ import annotations

import logging

import pytest
import torch

from vllm_kvevict.kernels import cpu_value_l1, native_build
from vllm_kvevict.policies import ops
from vllm_kvevict.policies.base import LayerInputs


def definition(values: torch.Tensor, o_proj: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``mean_{h in g} ||v[g, j] @ Wo[h]||_1`` in float64: ``[Hkv, L, d]``, ``[D, H*d]`` -> ``[Hkv, L]``."""
    hkv, length, d = values.shape
    wo = o_proj.double().t().reshape(num_heads, d, o_proj.shape[0])
    v = values.double().repeat_interleave(num_heads // hkv, dim=0)
    norms = torch.stack([(v[h] @ wo[h]).abs().sum(-1) for h in range(num_heads)])
    return norms.view(hkv, num_heads // hkv, length).mean(1)


def supported_isas() -> list[str]:
    best = cpu_value_l1.best_isa()
    return list(cpu_value_l1.ISAS[: cpu_value_l1.ISAS.index(best) + 1]) if best else []


def test_the_kernel_is_built_and_loads():
    assert cpu_value_l1.available(), (
        f"csrc/value_l1.cpp is not built ({cpu_value_l1.status()}); run scripts/setup.sh or "
        "`python -m vllm_kvevict.kernels.native_build`")
    assert cpu_value_l1.best_isa() in cpu_value_l1.ISAS
    assert cpu_value_l1._library().kvevict_value_l1_tile_cols() == cpu_value_l1.TILE_COLS


def test_a_packed_projection_is_reused_until_the_weight_changes():
    o_proj = torch.randn(100, 6 * 8)
    packed = cpu_value_l1.packed_output_projection(o_proj, 6)
    assert packed.shape == (6, 2, 8, 64) and torch.equal(packed[5, 1, 7, :36], o_proj[64:, 5 * 8 + 7])
    assert not packed[:, 1, :, 36:].any()  # zero past D
    assert cpu_value_l1.packed_output_projection(o_proj, 6) is packed
    o_proj.mul_(2)
    assert torch.equal(cpu_value_l1.packed_output_projection(o_proj, 6), 2 * packed)


def test_inference_tensors_as_the_serving_path_makes_them():
    """vLLM runs the forward under ``torch.inference_mode``: its weights have no version counter."""
    gen = torch.Generator().manual_seed(4)
    with torch.inference_mode():
        values = torch.randn(3, 70, 64, generator=gen)
        o_proj = torch.randn(576, 576, generator=gen) / 8
        got = cpu_value_l1.group_value_l1(values, o_proj, 9)
        assert cpu_value_l1.packed_output_projection(o_proj, 9) is cpu_value_l1.packed_output_projection(o_proj, 9)
    torch.testing.assert_close(got.double(), definition(values, o_proj, 9), rtol=2e-6, atol=1e-6)
    assert torch.equal(got, cpu_value_l1.group_value_l1(values, o_proj, 9))  # outside inference mode too


# (Hkv, G, L, d, D): SmolLM2's layer, then odd sizes: rows not a multiple of the 5-row step or
# the 64-row chunk, D not a multiple of the 64-column tile, d odd, single rows, G = 1.
SHAPES = [(3, 3, 333, 64, 576), (1, 1, 1, 1, 1), (2, 3, 7, 5, 13), (4, 2, 129, 64, 100),
          (2, 1, 66, 17, 65), (1, 4, 64, 128, 200), (3, 2, 0, 8, 16)]


@pytest.mark.parametrize("isa", cpu_value_l1.ISAS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_each_isa_path_matches_the_definition(isa, shape):
    if isa not in supported_isas():
        pytest.skip(f"this CPU lacks {isa}")
    hkv, groups, length, d, dim = shape
    gen = torch.Generator().manual_seed(sum(shape))
    values = torch.randn(hkv, length, d, generator=gen)
    o_proj = torch.randn(dim, hkv * groups * d, generator=gen) / d ** 0.5
    got = cpu_value_l1.group_value_l1(values, o_proj, hkv * groups, isa=isa)
    assert got.shape == (hkv, length) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), definition(values, o_proj, hkv * groups), rtol=2e-6, atol=1e-6)


def test_non_contiguous_and_low_precision_inputs():
    gen = torch.Generator().manual_seed(5)
    hkv, groups, length, d, dim = 3, 3, 150, 64, 576
    base = torch.randn(length, hkv, 2 * d, generator=gen)
    values = base[..., ::2].permute(1, 0, 2)  # [Hkv, L, d], strides (2d, Hkv*2d, 2): head dim strided
    o_proj = torch.randn(hkv * groups * d, dim, generator=gen).t()  # [D, H*d], column-major
    assert not values.is_contiguous() and not o_proj.is_contiguous()
    want = definition(values, o_proj, hkv * groups)
    torch.testing.assert_close(cpu_value_l1.group_value_l1(values, o_proj, hkv * groups).double(), want,
                               rtol=2e-6, atol=1e-6)
    rows = base[..., :d].permute(1, 0, 2)  # head dim contiguous, rows strided: read in place
    torch.testing.assert_close(cpu_value_l1.group_value_l1(rows, o_proj, hkv * groups).double(),
                               definition(rows, o_proj, hkv * groups), rtol=2e-6, atol=1e-6)
    half = values.bfloat16()
    torch.testing.assert_close(cpu_value_l1.group_value_l1(half, o_proj.bfloat16(), hkv * groups).double(),
                               definition(half.float(), o_proj.bfloat16().float(), hkv * groups), rtol=2e-6, atol=1e-6)


def test_a_row_is_the_same_float_whatever_the_threads_and_the_other_rows():
    gen = torch.Generator().manual_seed(9)
    values = torch.randn(3, 517, 64, generator=gen)
    o_proj = torch.randn(576, 576, generator=gen) / 8
    one = cpu_value_l1.group_value_l1(values, o_proj, 9, threads=1)
    assert torch.equal(one, cpu_value_l1.group_value_l1(values, o_proj, 9, threads=3))
    assert torch.equal(one[:, 100:401], cpu_value_l1.group_value_l1(values[:, 100:401], o_proj, 9))


def test_value_l1_norm_runs_the_kernel_and_agrees_with_the_torch_path():
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(3, 300, 64, generator=gen)
    o_proj = torch.randn(576, 576, generator=gen) / 8
    inputs = LayerInputs(keys=values, values=values, queries=torch.randn(9, 4, 64), o_proj=o_proj)
    native = ops.value_l1_norm(inputs)
    assert torch.equal(native, cpu_value_l1.group_value_l1(values, o_proj, 9))
    assert torch.equal(ops.value_l1_norm(inputs, impl="native"), native)
    torch.testing.assert_close(native, ops.value_l1_norm(inputs, impl="torch"), rtol=2e-6, atol=1e-6)
    assert not torch.equal(native, ops.value_l1_norm(inputs, impl="torch"))  # the kernel did run


def test_bad_arguments_name_the_field():
    values, o_proj = torch.randn(3, 10, 8), torch.randn(16, 72)
    inputs = LayerInputs(keys=values, values=values, queries=torch.randn(9, 4, 8), o_proj=o_proj)
    with pytest.raises(ValueError, match="impl must be"):
        ops.value_l1_norm(inputs, impl="mkl")
    with pytest.raises(ValueError, match="isa must be"):
        cpu_value_l1.group_value_l1(values, o_proj, 9, isa="sse9")
    with pytest.raises(ValueError, match="does not fit"):
        cpu_value_l1.group_value_l1(values, o_proj, 8)
    with pytest.raises(ValueError, match="o_proj"):
        ops.value_l1_norm(LayerInputs(keys=values, values=values, queries=torch.randn(9, 4, 8)), impl="native")


def test_without_a_build_the_torch_path_runs_and_says_so(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(native_build, "CSRC", tmp_path / "no-csrc")
    monkeypatch.setattr(native_build, "_loaded", {})
    monkeypatch.setattr(native_build, "_reasons", {})
    monkeypatch.setattr(cpu_value_l1, "_ready", {})
    values, o_proj = torch.randn(3, 10, 8), torch.randn(16, 72)
    inputs = LayerInputs(keys=values, values=values, queries=torch.randn(9, 4, 8), o_proj=o_proj)
    with caplog.at_level(logging.WARNING, logger=native_build.__name__):
        got = ops.value_l1_norm(inputs)
    assert torch.equal(got, ops.value_l1_norm_torch(inputs))
    assert "torch path runs instead" in caplog.text and "not found" in caplog.text
    assert cpu_value_l1.status().startswith("torch (kernel source")
    with pytest.raises(RuntimeError, match="not available"):
        cpu_value_l1.group_value_l1(values, o_proj, 9)


def test_a_build_is_cached_by_its_hash(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = native_build.build("value_l1")
    assert path.parent == tmp_path / "vllm-kvevict" / "kernels" and path.is_file()
    stamp = path.stat().st_mtime_ns
    assert native_build.build("value_l1") == path and path.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind
