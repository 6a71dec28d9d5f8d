"""CriticalKV's value norms without ``V @ Wo`` held for every row (issue 14).

``value_l1_norm`` streams rows through each KV group's projections; the definition is kvpress's
``vwl1norm`` (per query head ``||v[g, j] @ Wo[h]||_1``, then the mean over the group's heads),
written out here literally. The products are the same; the L1 sum is ``abs().sum()`` rather than
``torch.norm(p=1)`` (another summation order: about 1e-6 relative), so the test asks for rounding.
"""

from __future__ import annotations

import pytest
import torch

from vllm_kvevict.policies import ops
from vllm_kvevict.policies.base import LayerInputs


def kvpress_vwl1norm(values: torch.Tensor, o_proj: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The definition: ``values [Hkv, L, d]``, ``o_proj [D, H*d]`` -> ``[Hkv, L]``."""
    hkv, length, d = values.shape
    wo = o_proj.t().reshape(num_heads, d, o_proj.shape[0])
    v = values.repeat_interleave(num_heads // hkv, dim=0)
    norms = torch.stack([torch.norm(v[h] @ wo[h], p=1, dim=-1) for h in range(num_heads)])
    return norms.view(hkv, num_heads // hkv, length).mean(1)


@pytest.mark.parametrize("hkv,groups,length", [(3, 3, 700), (2, 1, 256), (1, 4, 1), (4, 2, 513)])
def test_value_l1_norm_is_the_group_mean_of_per_head_l1_norms(hkv, groups, length):
    torch.manual_seed(length)
    d, dim = 16, 40
    values = torch.randn(hkv, length, d)
    o_proj = torch.randn(dim, hkv * groups * d) / 8
    inputs = LayerInputs(keys=values, values=values, queries=torch.randn(hkv * groups, 4, d), o_proj=o_proj)
    got = ops.value_l1_norm(inputs)
    assert got.shape == (hkv, length)
    torch.testing.assert_close(got, kvpress_vwl1norm(values, o_proj, hkv * groups), rtol=1e-5, atol=0)
