"""The student's forward pass and the distillation loss.

The compressed part of a prompt is prefilled once with the full cache (its keys and values do
not depend on what is evicted later: eviction happens after the prefill). The tokens after it
(the question and the answer, or a text's continuation) are then run over that cache, each
(layer, KV head, cached token) weighted by a keep-mask ``m`` (``log m`` added to the attention
logits, so ``m`` in ``{0, 1}`` is exactly eviction). The teacher is the same pass with every
``m = 1``; the loss is ``KL(teacher || student)`` of the next-token distributions.

Shapes: ``nb`` budgets in a batch, ``T`` suffix tokens, ``L`` cached tokens, ``D`` hidden size,
``H`` query heads, ``Hkv`` KV heads, ``d`` head dim, ``V`` vocabulary.
"""

from __future__ import annotations

from typing import Optional

import torch

from vllm_kvevict.reference.model_parts import DecoderParts, apply_rope

#: ``log m`` never below this (a mask of 0 is an evicted token).
LOG_MASK_FLOOR = -30.0


def _project(parts: DecoderParts, layer_idx: int, hidden: torch.Tensor):
    """``hidden [nb, T, D]`` -> pre-RoPE ``q [nb, H, T, d]``, ``k, v [nb, Hkv, T, d]``."""
    layer = parts.layers[layer_idx]
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    nb, t, _ = x.shape
    q = attn.q_proj(x).view(nb, t, parts.num_heads, parts.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(nb, t, parts.num_kv_heads, parts.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(nb, t, parts.num_kv_heads, parts.head_dim).transpose(1, 2)
    return q, k, v


def _finish(parts: DecoderParts, layer_idx: int, residual: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out [nb, H, T, d]`` through ``o_proj``, the residual and the MLP -> ``[nb, T, D]``."""
    layer = parts.layers[layer_idx]
    nb, _, t, _ = out.shape
    merged = out.transpose(1, 2).reshape(nb, t, parts.num_heads * parts.head_dim)
    hidden = residual + layer.self_attn.o_proj(merged)
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def _attend(parts: DecoderParts, q, k_ctx, v_ctx, k_new, v_new, log_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Attention of ``q [nb, H, T, d]`` over the cached ``k_ctx, v_ctx [Hkv, L, d]`` (weighted by
    ``log_mask [nb, Hkv, L]``) and, causally, over the suffix's own ``k_new, v_new [nb, Hkv, T, d]``."""
    g = parts.group_size
    kc, vc = k_ctx.repeat_interleave(g, dim=0), v_ctx.repeat_interleave(g, dim=0)
    kn, vn = k_new.repeat_interleave(g, dim=1), v_new.repeat_interleave(g, dim=1)
    ctx = torch.einsum("bhtd,hld->bhtl", q, kc) * parts.scale
    if log_mask is not None:
        ctx = ctx + log_mask.repeat_interleave(g, dim=1)[:, :, None, :]
    new = torch.einsum("bhtd,bhsd->bhts", q, kn) * parts.scale
    t = q.shape[2]
    new = new.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1), float("-inf"))
    probs = torch.softmax(torch.cat((ctx, new), dim=-1), dim=-1)
    length = kc.shape[1]
    return torch.einsum("bhtl,hld->bhtd", probs[..., :length], vc) + torch.einsum("bhts,bhsd->bhtd", probs[..., length:], vn)


def suffix_hidden(parts: DecoderParts, keys: list[torch.Tensor], values: list[torch.Tensor], suffix_ids: torch.Tensor,
                  masks: Optional[list[torch.Tensor]], batch: int = 1) -> torch.Tensor:
    """Final hidden states ``[nb, T, D]`` of ``suffix_ids [T]`` run after the cached tokens.

    Parameters
    ----------
    keys, values : per layer ``[Hkv, L, d]`` (keys post-RoPE) of the compressed part.
    masks : per layer ``[nb, Hkv, L]`` keep-masks in ``[0, 1]``; ``None`` keeps everything
        (the teacher; then ``nb = batch``).
    """
    length = keys[0].shape[1]
    nb = masks[0].shape[0] if masks is not None else batch
    positions = torch.arange(length, length + suffix_ids.shape[0])
    cos, sin = parts.rope_tables(positions)
    hidden = parts.embed_tokens(suffix_ids)[None].expand(nb, -1, -1)
    for layer in range(parts.num_layers):
        q, k, v = _project(parts, layer, hidden)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        log_mask = None if masks is None else masks[layer].clamp_min(1e-30).log().clamp_min(LOG_MASK_FLOOR)
        out = _attend(parts, q, keys[layer], values[layer], k, v, log_mask)
        hidden = _finish(parts, layer, hidden, out)
    return hidden


def log_probs(parts: DecoderParts, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``log softmax`` of the logits at suffix positions ``rows [n]``: ``[nb, n, V]``."""
    return torch.log_softmax(parts.logits(hidden[:, rows]), dim=-1)


def distill_loss(teacher: torch.Tensor, student: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``[nb]``: weighted mean over positions of ``KL(teacher || student)``.

    ``teacher [n, V]`` and ``student [nb, n, V]`` log-probabilities, ``weights [n]``.
    """
    kl = (teacher.exp() * (teacher - student)).sum(-1)  # [nb, n]
    return (kl * weights).sum(-1) / weights.sum()
