"""What the attention impl does for rows being prefilled: observe queries, score the prompt.

Per layer, after the stock kernel wrote the layer's K/V: stash the window queries, add pre-RoPE
query statistics (``expected_attention``) or attention sums (``h2o``), and, in the chunk that
completes the prompt, score every cached token with the request's policy. Results go into the
request's :class:`~vllm_kvevict.vllm.step.Observations`; a failure marks it (the request then
stays whole) and never reaches the engine.
"""

from __future__ import annotations

import logging
import time

import torch

from vllm_kvevict.policies.base import LayerInputs
from vllm_kvevict.vllm.backends.query_stats import FUTURE_POSITIONS, QueryStats, rope_cos_sin, unrotate
from vllm_kvevict.vllm.layouts import PagedLayout
from vllm_kvevict.vllm.step import EvictionStep, RowObservation

logger = logging.getLogger(__name__)

#: Query rows per block when accumulating h2o's attention sums.
ATTENTION_ROWS = 256


def observe_rows(step: EvictionStep, layer_name: str, layer_idx: int, query: torch.Tensor, kv_cache: torch.Tensor,
                 layout: PagedLayout, num_heads: int, scale: float, unsupported: str = "") -> None:
    """Observe every row of ``step.observe`` for this layer (``query [tokens, H * d]``)."""
    for row in step.observe.values():
        if row.sink.error is None:
            guarded(row, "scoring", "request left whole", unsupported,
                    lambda: _observe(step, row, layer_name, layer_idx, query, kv_cache, layout, num_heads, scale))


def guarded(row, what: str, outcome: str, unsupported: str, run) -> None:
    """``run()`` for one row, timed into its sink: a failure (or ``unsupported``, the layer's
    reason it cannot be scored) is logged and fails that row only, never the engine core."""
    started = time.perf_counter()
    try:
        if unsupported:
            raise RuntimeError(unsupported)
        run()
    except Exception as exc:
        logger.warning("kvevict: %s failed for %s, %s: %s", what, row.req_id, outcome, exc)
        logger.debug("kvevict: %s failure", what, exc_info=exc)
        row.sink.fail(f"{type(exc).__name__}: {exc}")
    row.sink.seconds += time.perf_counter() - started


def scored(policy, inputs: LayerInputs, num_kv_heads: int, length: int):
    """``policy.score_layer(inputs)``, its ``[Hkv, length]`` shape checked."""
    scores = policy.score_layer(inputs)
    if tuple(scores.values.shape) != (num_kv_heads, length):
        raise RuntimeError(f"scorer returned {tuple(scores.values.shape)}, expected {(num_kv_heads, length)}")
    return scores


def _observe(step, row: RowObservation, layer_name, layer_idx, query, kv_cache, layout, num_heads, scale) -> None:
    sink, needs = row.sink, row.sink.policy.needs
    if sink.fault == "scoring" and row.score:
        raise RuntimeError("injected scoring fault")
    q = query.view(query.shape[0], num_heads, layout.head_dim)[row.query_offset : row.query_offset + row.num_queries]
    w0, w1 = row.window
    if w1 > w0:
        sink.window_queries.setdefault(layer_idx, []).append(q[w0:w1].detach().float().clone())
    c0, c1 = row.collect
    collected = q[c0:c1]
    if c1 > c0 and needs.query_stats:
        _add_query_stats(step, row, layer_name, layer_idx, collected)
    summing = c1 > c0 and needs.attention_sums
    if not (row.score or summing):
        return
    length = row.prompt_len if row.score else row.start + c1
    keys, values = layout.gather(kv_cache, row.block_ids, length)
    keys = keys.float()
    if summing:
        _add_attention(sink, layer_idx, collected, keys, row.start + c0, scale)
    if not row.score:
        return
    window = sink.window_queries.get(layer_idx)
    inputs = LayerInputs(
        keys=keys,
        values=values.float(),
        queries=(torch.cat(window, dim=0) if window else q[:0].float()).transpose(0, 1),
        positions=torch.arange(length),
        o_proj=step.model.o_proj_of(layer_name) if needs.o_proj else None,
        layer_idx=layer_idx,
        num_layers=step.model.num_layers,
        scale=scale,
        **_query_inputs(step, row, layer_name, layer_idx),
    )
    sink.scores[layer_idx] = scored(sink.policy, inputs, layout.num_kv_heads, length)


def _add_query_stats(step, row: RowObservation, layer_name: str, layer_idx: int, queries: torch.Tensor) -> None:
    """Un-rotate ``queries [n, H, d]`` (rows ``collect``) and add them to the running statistics."""
    sink = row.sink
    first = row.start + row.collect[0]
    cos, sin = rope_cos_sin(step.model.rotary_of(layer_name), torch.arange(first, first + queries.shape[0]))
    stats = sink.query_stats.get(layer_idx)
    if stats is None:
        keep_raw = QueryStats.keeps_raw(sink.prompt_len, sink.config.resolved_sinks, queries.shape[-1])
        stats = sink.query_stats[layer_idx] = QueryStats(keep_raw=keep_raw)
    stats.add(unrotate(queries.float().cpu(), cos, sin))


def _add_attention(sink, layer_idx: int, queries: torch.Tensor, keys: torch.Tensor, first: int, scale: float) -> None:
    """Add the attention ``queries [n, H, d]`` at positions ``first ..`` pay to ``keys [Hkv, T, d]``
    (causal: the query at position ``p`` sees keys ``0 .. p``)."""
    n, heads = queries.shape[0], queries.shape[1]
    total = sink.attention_sum.get(layer_idx)
    if total is None:
        total = sink.attention_sum[layer_idx] = torch.zeros(heads, sink.prompt_len)
    k = keys.repeat_interleave(heads // keys.shape[0], dim=0)[:, : first + n]  # [H, T, d]
    cols = torch.arange(first + n).view(1, -1)
    for lo in range(0, n, ATTENTION_ROWS):  # bounded [H, rows, T] temporaries
        q = queries[lo : lo + ATTENTION_ROWS].float()
        logits = torch.einsum("nhd,htd->hnt", q, k) * scale
        causal = cols > (first + lo + torch.arange(q.shape[0])).view(-1, 1)
        total[:, : first + n] += torch.softmax(logits.masked_fill(causal, float("-inf")), dim=-1).sum(dim=1)


def _query_inputs(step, row: RowObservation, layer_name: str, layer_idx: int) -> dict:
    """Extra ``LayerInputs`` fields the request's scorer reads (empty if none)."""
    sink, needs = row.sink, row.sink.policy.needs
    if needs.attention_sums:
        return {"attention_sum": sink.attention_sum[layer_idx]}
    if not needs.query_stats:
        return {}
    length = sink.prompt_len
    cos, sin = rope_cos_sin(step.model.rotary_of(layer_name), torch.arange(length, length + FUTURE_POSITIONS))
    return {"queries_pre_rope": sink.query_stats[layer_idx].as_queries(), "rope_cos": cos, "rope_sin": sin}
