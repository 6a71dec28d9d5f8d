"""Decode-time eviction at head granularity: score and plan the tokens each (layer, KV head) holds.

A head-granular request's heads hold different tokens (each its own kept set, then the
positional tail), so its held tokens are scored head by head: every KV head's held keys and
values, with its group's window queries, are one one-head :class:`LayerInputs` (the scorers
decode-time eviction allows at head granularity score each KV head from its own tensors
alone). The scores are then laid on the positions ``0 .. seq_len - 1``, a position a head does
not hold being ``-inf`` and unprotected (ranked after every held one), and
:meth:`Policy.plan_head` plans on that, exactly as after the prompt: whole block-aligned runs
per head (a held run is whole: the run holding a window position is always kept) or single
tokens. The vLLM plugin and the reference engine call these two functions, nothing else.
"""

from __future__ import annotations

from typing import Optional

import torch

from vllm_kvevict.policies.base import LayerInputs, LayerScores
from vllm_kvevict.policies.select import KeptSet

#: The score of a position a head does not hold.
NOT_HELD = float("-inf")


def held_layer_scores(policy, keys: list[torch.Tensor], values: list[torch.Tensor], positions: list[torch.Tensor],
                      queries: torch.Tensor, seq_len: int, *, layer_idx: int, num_layers: int,
                      scale: Optional[float], o_proj: Optional[torch.Tensor] = None) -> LayerScores:
    """``[Hkv, seq_len]`` positional scores of one layer's held tokens.

    Parameters
    ----------
    policy : the request's :class:`~vllm_kvevict.policies.Policy`.
    keys, values : per KV head ``g``, ``[n_g, d]`` the held tokens (post-RoPE keys), in position order.
    positions : per KV head, ``[n_g]`` int64 their positions (ascending, ``< seq_len``).
    queries : ``[H, W, d]`` the window's post-RoPE queries; KV head ``g`` reads heads ``g * G ..``.
    o_proj : ``[D, H * d]`` the layer's output projection, for scorers that read it (CriticalKV's
        value norms): KV head ``g`` reads the columns of its group's heads, ``[D, G * d]``.
    """
    num_kv_heads = len(keys)
    group = queries.shape[0] // num_kv_heads
    head_dim = queries.shape[-1]
    out = torch.full((num_kv_heads, seq_len), NOT_HELD, dtype=torch.float32)
    protected = torch.zeros(num_kv_heads, seq_len, dtype=torch.bool)
    for g in range(num_kv_heads):
        pos = positions[g].to(torch.long)
        if pos.numel() and (int(pos.max()) >= seq_len or bool((pos[1:] <= pos[:-1]).any())):
            raise ValueError(f"head {g}: held positions must be ascending and below {seq_len}")
        inputs = LayerInputs(keys=keys[g][None].float(), values=values[g][None].float(),
                             queries=queries[g * group : (g + 1) * group].float(), positions=pos,
                             layer_idx=layer_idx, num_layers=num_layers, scale=scale, budget_len=seq_len,
                             o_proj=None if o_proj is None else o_proj[:, g * group * head_dim : (g + 1) * group * head_dim])
        scores = policy.score_layer(inputs)
        if tuple(scores.values.shape) != (1, pos.numel()):
            raise ValueError(f"head {g}: scores {tuple(scores.values.shape)} for {pos.numel()} held tokens")
        if scores.preferred is not None or scores.head_budgets is not None or scores.residuals is not None:
            raise ValueError("decode-time eviction at head granularity takes plain token scores")
        out[g, pos] = scores.values[0]
        protected[g, pos] = scores.protected[0]
    return LayerScores(values=out, protected=protected)


def plan_held(policy, scores: list[LayerScores], seq_len: int, held: list[list[torch.Tensor]]) -> KeptSet:
    """Every (layer, KV head)'s kept positions among those it holds (``held[l][g]``).

    :meth:`Policy.plan_head` on the positional scores of :func:`held_layer_scores`; a plan that
    keeps every position (a budget of the whole length) keeps what is held. Raises
    ``ValueError`` if a head would keep a position it does not hold (its budget exceeded what
    it holds).
    """
    kept = policy.plan_head(scores, seq_len)
    indices = []
    for layer, (kept_row, held_row) in enumerate(zip(kept.indices, held)):
        row = []
        for g, (k, h) in enumerate(zip(kept_row, held_row)):
            if not bool(torch.isin(k, h).all()):
                if k.numel() == seq_len:  # keeps everything: what it holds
                    k = h.clone()
                else:
                    raise ValueError(f"layer {layer} head {g} keeps {k.numel()} tokens, not all of its "
                                     f"{h.numel()} held ones")
            row.append(k.to(torch.long))
        indices.append(row)
    budgets = torch.tensor([[int(k.numel()) for k in row] for row in indices], dtype=torch.int64)
    return KeptSet(indices=indices, head_budgets=budgets, scores=list(scores))
