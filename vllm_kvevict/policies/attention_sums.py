"""h2o's statistic: the softmax attention a run of queries pays each key, summed over the queries.

One function for both engines (the plugin's decode rows, :mod:`vllm_kvevict.vllm.backends.decode_observe`,
and the reference engine's :class:`~vllm_kvevict.reference.decode_eviction.DecodeEvictor`), so
that both add the same thing to their running sums at every decode step.
"""

from __future__ import annotations

from typing import Optional

import torch

from vllm_kvevict.policies.ops import repeat_kv

#: Query rows per block (bounded ``[H, rows, T]`` temporaries).
ATTENTION_ROWS = 256


def attention_paid(queries: torch.Tensor, keys: torch.Tensor, scale: float, first: Optional[int] = None) -> torch.Tensor:
    """``[H, T]`` float32: the attention the queries ``[H, n, d]`` pay the keys ``[Hkv, T, d]``,
    summed over the queries, per query head (head ``h`` reads KV head ``h // (H / Hkv)``).

    Causal: query ``i`` sits at key index ``first + i`` and sees keys ``0 .. first + i``;
    ``first`` defaults to ``T - n`` (the queries are those of the last ``n`` keys, as in a decode
    step over the held tokens, the new ones included).
    """
    heads, n = queries.shape[0], queries.shape[1]
    length = keys.shape[1]
    first = length - n if first is None else first
    if not 0 <= first <= length - n:
        raise ValueError(f"{n} queries from key index {first} do not fit {length} keys")
    k = repeat_kv(keys.float(), heads // keys.shape[0])  # [H, T, d]
    total = torch.zeros(heads, length, dtype=torch.float32)
    cols = torch.arange(length).view(1, -1)
    for lo in range(0, n, ATTENTION_ROWS):
        q = queries[:, lo : lo + ATTENTION_ROWS].float()  # [H, r, d]
        logits = torch.matmul(q, k.transpose(1, 2)) * scale  # [H, r, T]
        causal = cols > (first + lo + torch.arange(q.shape[1])).view(-1, 1)
        total += torch.softmax(logits.masked_fill(causal, float("-inf")), dim=-1).sum(dim=1)
    return total
