"""Tensor helpers shared by the scorers: window attention, pooling, group means, value norms.

Operation order mirrors NVIDIA kvpress 0.5.5 where a kvpress press computes the same thing
(``SnapKVPress.compute_window_attention``, ``CriticalKVPress.vwl1norm``), so that kept sets
match it exactly, not only up to rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vllm_kvevict.kernels import cpu_value_l1
from vllm_kvevict.policies.base import LayerInputs, LayerScores


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[Hkv, L, d]`` -> ``[Hkv * groups, L, d]`` (query head ``h`` reads KV head ``h // groups``)."""
    if groups == 1:
        return x
    hkv, length, dim = x.shape
    return x[:, None].expand(hkv, groups, length, dim).reshape(hkv * groups, length, dim)


def window_attention(inputs: LayerInputs, window: int) -> torch.Tensor:
    """Softmax attention of the last ``window`` queries over all ``L`` keys, causal in the window.

    kvpress's ``compute_window_attention`` (``repeat_kv`` of the keys, a batch of ``[W, d] x
    [d, L]`` products, one per query head; scale; add a ``-inf`` triangle; softmax) without its
    copies: the ``G`` query heads of a KV head are one batch against that head's keys read in
    place (a stride-0 batch, never repeated), and scale, mask and softmax run in place. Every
    product keeps kvpress's shape, so each logit is the same dot product and each softmax row
    the same row: the floats equal kvpress's order (tests/unit/test_policies_window_attention.py;
    tests/parity checks the kept sets).

    Returns
    -------
    ``[H, W, L]`` float32: ``A[h, t, j]``, query ``t`` sits at position ``L - W + t``.
    """
    keys = inputs.keys.float()
    hkv, length, dim = keys.shape
    queries = inputs.queries[:, -window:].float()
    heads, w = queries.shape[0], queries.shape[1]
    groups = heads // hkv
    if groups * hkv != heads:
        raise ValueError(f"queries have {heads} heads, not a multiple of the keys' {hkv} KV heads")
    logits = torch.empty(heads, w, length, device=keys.device)
    for g in range(hkv):
        rows = slice(g * groups, (g + 1) * groups)
        torch.bmm(queries[rows], keys[g].T.expand(groups, dim, length), out=logits[rows])
    if inputs.scale is None:
        logits.div_(math.sqrt(inputs.head_dim))
    else:
        logits.mul_(inputs.scale)
    # kvpress adds triu(-inf, diagonal=L-W+1) over [W, L]; x + 0 is x, so only the triangle in
    # the window's own columns changes.
    causal = torch.ones(w, w, dtype=torch.bool, device=keys.device).triu(1)
    logits[:, :, length - w :].masked_fill_(causal, float("-inf"))
    return torch.softmax(logits, dim=-1, out=logits)


def pool_tokens(scores: torch.Tensor, kernel: int, kind: str = "avg") -> torch.Tensor:
    """Pool ``[..., N]`` along tokens: stride 1, padding ``kernel // 2`` (zeros counted, kvpress).

    ``kind`` is ``"avg"`` or ``"max"``; ``kernel == 1`` returns the scores unchanged.
    """
    if kernel <= 1 or scores.shape[-1] == 0:
        return scores
    shape = scores.shape
    flat = scores.reshape(1, -1, shape[-1])
    if kind == "max":
        pooled = F.max_pool1d(flat, kernel_size=kernel, padding=kernel // 2, stride=1)
    else:
        pooled = F.avg_pool1d(flat, kernel_size=kernel, padding=kernel // 2, stride=1)
    return pooled.reshape(shape)


def group_mean(per_query_head: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[H, N]`` -> ``[Hkv, N]``: mean over the query heads that share a KV head."""
    h, n = per_query_head.shape
    return per_query_head.view(num_kv_heads, h // num_kv_heads, n).mean(1)


def output_projection(inputs: LayerInputs) -> torch.Tensor:
    """``Wo[h]`` blocks: ``[H, d, D]`` (rows of ``o_proj.weight.T`` belonging to query head ``h``)."""
    if inputs.o_proj is None:
        raise ValueError("this scorer needs LayerInputs.o_proj (the o_proj weight [D, H*d])")
    wo = inputs.o_proj.float().transpose(0, 1)
    return wo.reshape(inputs.num_heads, inputs.head_dim, wo.shape[1])


#: Value rows per GEMM in :func:`value_l1_norm`: ``[rows, G * D]`` products stay in the L2 cache
#: while their L1 norms are taken (float32, SmolLM2: 256 x 1728 x 4 bytes).
VALUE_NORM_ROWS = 256


def value_l1_norm(inputs: LayerInputs, impl: str = "auto") -> torch.Tensor:
    """CriticalKV's ``nbar1[g, j]``: mean over the group of ``||v[g, j] @ Wo[h]||_1``, ``[Hkv, L]``.

    kvpress's ``vwl1norm``, never materialising ``V @ Wo`` for all rows. ``impl="auto"`` runs the
    C++ kernel (``kernels/cpu_value_l1``: products in registers, never stored) on CPU tensors
    when it is built, else :func:`value_l1_norm_torch`; ``"native"`` or ``"torch"`` force one.
    The plugin, the reference engine and the kvpress parity test all come through here, so on
    one machine they compute the same floats; the two paths differ from each other and from
    kvpress's ``torch.norm(p=1)`` in summation order only (about 1e-7 relative), and kept sets
    against kvpress are checked exactly by tests/parity.
    """
    if impl not in ("auto", "native", "torch"):
        raise ValueError(f"impl must be 'auto', 'native' or 'torch', got {impl!r}")
    wo_missing = inputs.o_proj is None
    if impl == "native" or (impl == "auto" and not wo_missing and inputs.values.device.type == "cpu"
                            and inputs.o_proj.device.type == "cpu" and cpu_value_l1.available()):
        if wo_missing:
            output_projection(inputs)  # raises the missing-o_proj error
        return cpu_value_l1.group_value_l1(inputs.values, inputs.o_proj, inputs.num_heads)
    return value_l1_norm_torch(inputs)


def value_l1_norm_torch(inputs: LayerInputs) -> torch.Tensor:
    """:func:`value_l1_norm` in torch: per KV head, :data:`VALUE_NORM_ROWS` values at a time go
    through the group's ``G`` projections at once (``[d, G * D]``), only their norms kept. Each
    product is the same dot product over ``d`` as kvpress's; the norm is ``abs().sum()``
    (vectorised: ten times faster here than ``torch.norm(p=1)``)."""
    wo = output_projection(inputs)  # [H, d, D]
    hkv, groups, dim = inputs.num_kv_heads, inputs.group_size, wo.shape[2]
    grouped = wo.view(hkv, groups, inputs.head_dim, dim).permute(0, 2, 1, 3).reshape(hkv, inputs.head_dim, groups * dim)
    values = inputs.values.float()
    length = values.shape[1]
    norms = torch.empty(hkv, length, groups)
    for g in range(hkv):
        for lo in range(0, length, VALUE_NORM_ROWS):
            proj = values[g, lo : lo + VALUE_NORM_ROWS].matmul(grouped[g]).view(-1, groups, dim)
            torch.sum(proj.abs_(), dim=-1, out=norms[g, lo : lo + VALUE_NORM_ROWS])
    return group_mean(norms.permute(0, 2, 1).reshape(hkv * groups, length), hkv)


def output_gram(inputs: LayerInputs) -> torch.Tensor:
    """``Wo[h] @ Wo[h]^T``: ``[H, d, d]``, so that ``||x @ Wo[h]||_2^2 = x^T G_h x``."""
    wo = output_projection(inputs)
    return wo @ wo.transpose(1, 2)


def value_l2_norm(inputs: LayerInputs) -> torch.Tensor:
    """``||v[g, j] @ Wo[h]||_2`` per query head, ``[H, L]``, via the ``d x d`` Gram matrix."""
    gram = output_gram(inputs)
    values = repeat_kv(inputs.values.float(), inputs.group_size)
    sq = torch.einsum("hld,hde,hle->hl", values, gram, values)
    return sq.clamp_min(0).sqrt()


def candidates_then_protected(candidate_scores: torch.Tensor, length: int) -> LayerScores:
    """``[Hkv, Lc]`` scores of the first ``Lc`` positions; the last ``L - Lc`` protected (values 0)."""
    values = F.pad(candidate_scores.float(), (0, length - candidate_scores.shape[-1]))
    protected = torch.zeros(values.shape, dtype=torch.bool)
    protected[:, candidate_scores.shape[-1] :] = True
    return LayerScores(values=values, protected=protected)
