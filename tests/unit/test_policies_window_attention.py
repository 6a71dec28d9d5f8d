"""``window_attention`` against kvpress 0.5.5's order of operations, float for float.

kvpress's ``SnapKVPress.compute_window_attention`` repeats the keys per query head, multiplies
``[1, H, W, d] x [1, H, d, L]``, scales, adds a ``-inf`` triangle and takes a float32 softmax.
Ours reads each KV head's keys in place and works in place; every product keeps kvpress's
per-head shape and operands (the same ``[W, d]`` queries, the same transposed ``[d, L]`` keys), so
both sides hand the GEMM the same matrices and the results are the same floats on any CPU: the
comparisons here are exact.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vllm_kvevict.policies.base import LayerInputs
from vllm_kvevict.policies.ops import repeat_kv, window_attention

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def kvpress_window_attention(inputs: LayerInputs, window: int) -> torch.Tensor:
    """kvpress 0.5.5's ``compute_window_attention`` on our ``[H, W, d]`` / ``[Hkv, L, d]`` inputs."""
    queries = inputs.queries[:, -window:].float()
    keys = repeat_kv(inputs.keys.float(), inputs.group_size)
    length, w = keys.shape[1], queries.shape[1]
    logits = torch.matmul(queries.unsqueeze(0), keys.unsqueeze(0).transpose(2, 3))
    logits = logits / math.sqrt(inputs.head_dim) if inputs.scale is None else logits * inputs.scale
    mask = torch.triu(torch.full((w, length), float("-inf")), diagonal=length - w + 1)
    return F.softmax(logits + mask, dim=-1, dtype=torch.float32)[0]


def layer(length: int, window: int, hkv: int, groups: int, dim: int, scale, dtype=torch.float32) -> LayerInputs:
    """Random keys and window queries, the queries laid out as the plugin stashes them
    (``[W, H, d]`` rows, transposed: a strided ``[H, W, d]``)."""
    gen = torch.Generator().manual_seed(length * 31 + window)
    queries = (2 * torch.randn(window, hkv * groups, dim, generator=gen)).transpose(0, 1)
    keys = 2 * torch.randn(hkv, length, dim, generator=gen)
    return LayerInputs(keys=keys.to(dtype), values=keys.clone(), queries=queries.to(dtype), scale=scale)


SHAPES = [  # length, window, Hkv, G, d, scale
    (700, 64, 3, 3, 64, None),     # the parity test's SmolLM2 prefill, kvpress's window
    (2048, 32, 3, 3, 64, 0.125),   # the served scorer's default window
    (1999, 32, 3, 3, 64, None),    # a partial last page
    (1000, 64, 2, 4, 128, 0.1),
    (777, 16, 4, 1, 64, None),     # no grouping
    (300, 8, 1, 6, 32, 0.3),
    (33, 1, 3, 3, 64, None),       # TOVA's one query
    (5, 5, 2, 2, 8, None),         # window = every position
]


@pytest.mark.parametrize("length, window, hkv, groups, dim, scale", SHAPES)
def test_window_attention_equals_kvpress_order(length, window, hkv, groups, dim, scale):
    inputs = layer(length, window, hkv, groups, dim, scale)
    for w in sorted({window, 1, max(1, window // 2)}):
        ours, theirs = window_attention(inputs, w), kvpress_window_attention(inputs, w)
        assert ours.shape == (hkv * groups, w, length)
        assert torch.equal(ours, theirs), f"window {w}: max diff {(ours - theirs).abs().max().item()}"


def test_window_attention_bfloat16_inputs_computed_in_float32():
    inputs = layer(200, 16, 2, 3, 64, None, dtype=torch.bfloat16)
    ours = window_attention(inputs, 16)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, kvpress_window_attention(inputs, 16))


def test_window_attention_rows_sum_to_one_and_are_causal():
    attn = window_attention(layer(64, 8, 2, 2, 16, None), 8)
    assert torch.allclose(attn.sum(-1), torch.ones(4, 8), atol=1e-6)
    for t in range(8):  # window query t sits at position 56 + t and sees nothing after it
        assert bool((attn[:, t, 57 + t :] == 0).all())


def test_window_attention_rejects_heads_not_a_multiple_of_kv_heads():
    inputs = LayerInputs(keys=torch.zeros(2, 10, 4), values=torch.zeros(2, 10, 4), queries=torch.zeros(3, 2, 4))
    with pytest.raises(ValueError, match="3 heads, not a multiple of the keys' 2 KV heads"):
        window_attention(inputs, 2)
