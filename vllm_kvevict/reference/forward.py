"""Forward passes of the reference engine: the prompt (full causal), and new tokens over a
:class:`HeadCache` (each KV head attends over only the tokens it kept).

New tokens take their true logical positions; kept tokens keep the RoPE rotation they were
cached with, and a query at position ``p`` sees every cached token whose position is ``<= p``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from vllm_kvevict.reference.head_cache import HeadCache
from vllm_kvevict.reference.model_parts import DecoderParts, apply_rope


@dataclass
class PromptPass:
    """What one full-cache pass over a prompt leaves behind.

    Attributes
    ----------
    keys, values : per layer ``[Hkv, L, d]``; keys post-RoPE.
    queries_pre_rope : per layer ``[H, N, d]`` pre-RoPE queries of the last ``N`` prompt tokens.
    last_logits : ``[V]`` float32 logits after the last prompt token.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    queries_pre_rope: list[torch.Tensor]
    last_logits: torch.Tensor


@torch.no_grad()
def run_prompt(parts: DecoderParts, input_ids: torch.Tensor, keep_queries: int | None = None) -> PromptPass:
    """Run ``input_ids [L]`` with full causal attention (positions ``0 .. L-1``).

    ``keep_queries``: how many of the last tokens' pre-RoPE queries to keep (``None``: all).
    """
    L = input_ids.shape[0]
    cos, sin = parts.rope_tables(torch.arange(L))
    hidden = parts.embed_tokens(input_ids)
    n_q = L if keep_queries is None else min(L, keep_queries)
    keys, values, queries = [], [], []
    for layer_idx in range(parts.num_layers):
        q, k, v = parts.project(layer_idx, hidden)
        queries.append(q[:, L - n_q :].clone())
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys.append(k.contiguous())
        values.append(v.contiguous())
        g = parts.group_size
        out = F.scaled_dot_product_attention(
            q.unsqueeze(0),
            k.repeat_interleave(g, dim=0).unsqueeze(0),
            v.repeat_interleave(g, dim=0).unsqueeze(0),
            is_causal=True,
            scale=parts.scale,
        )[0]
        hidden = parts.finish(layer_idx, hidden, out)
    last_logits = parts.logits(hidden[-1:])[0]
    return PromptPass(keys, values, queries, last_logits)


def attend_ragged(
    queries: torch.Tensor, query_positions: torch.Tensor, cache: HeadCache, layer: int, scale: float
) -> torch.Tensor:
    """Attention of ``queries [H, T, d]`` over each KV head's own kept tokens.

    Query head ``h`` reads KV head ``h // G``; a query at position ``p`` sees cached tokens at
    positions ``<= p``. Returns ``[H, T, d]``.
    """
    stores = cache.stores[layer]
    group = queries.shape[0] // len(stores)
    outs = []
    for head, store in enumerate(stores):
        q = queries[head * group : (head + 1) * group]  # [G, T, d]
        scores = torch.matmul(q, store.keys.transpose(0, 1)) * scale  # [G, T, n]
        visible = store.positions.view(1, -1) <= query_positions.view(-1, 1)  # [T, n]
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        outs.append(torch.matmul(probs, store.values))
    return torch.cat(outs, dim=0)


@torch.no_grad()
def run_tokens(parts: DecoderParts, cache: HeadCache, token_ids: torch.Tensor, positions: torch.Tensor,
               queries_out: Optional[list] = None) -> torch.Tensor:
    """Run new tokens ``[T]`` at logical ``positions [T]`` over ``cache`` (appending them to it).

    ``queries_out``: if given, every layer's post-RoPE queries ``[H, T, d]`` are appended to it
    (the window of decode-time eviction).

    Returns ``[T, V]`` float32 logits.
    """
    cos, sin = parts.rope_tables(positions)
    hidden = parts.embed_tokens(token_ids)
    for layer_idx in range(parts.num_layers):
        q, k, v = parts.project(layer_idx, hidden)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if queries_out is not None:
            queries_out.append(q)
        cache.append(layer_idx, k, v, positions)
        out = attend_ragged(q, positions, cache, layer_idx, parts.scale)
        hidden = parts.finish(layer_idx, hidden, out)
    return parts.logits(hidden)


@torch.no_grad()
def greedy_decode(
    parts: DecoderParts,
    cache: HeadCache,
    logits: torch.Tensor,
    position: int,
    max_new_tokens: int,
    stop_ids: frozenset[int],
) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens from ``logits [V]`` (those after the last token in ``cache``), the first
    fed at ``position``; stops after a token in ``stop_ids`` (kept) or ``max_new_tokens``.

    Returns the tokens and ``[n, V]`` the logits each was chosen from.
    """
    def feed(token: int, at: int) -> torch.Tensor:
        return run_tokens(parts, cache, torch.tensor([token]), torch.tensor([at]))[0]

    return greedy_loop(feed, logits, position, max_new_tokens, stop_ids)


def greedy_loop(feed, logits: torch.Tensor, position: int, max_new_tokens: int,
                stop_ids: frozenset[int]) -> tuple[list[int], torch.Tensor]:
    """The greedy loop of :func:`greedy_decode`, each chosen token fed by ``feed(token, position)``
    (which returns the next logits)."""
    tokens: list[int] = []
    chosen_from: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        token = int(torch.argmax(logits))
        tokens.append(token)
        chosen_from.append(logits)
        if token in stop_ids or step == max_new_tokens - 1:
            break
        logits = feed(token, position)
        position += 1
    return tokens, torch.stack(chosen_from) if chosen_from else torch.empty(0)
