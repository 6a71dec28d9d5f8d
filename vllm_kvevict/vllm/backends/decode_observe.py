"""What the attention impl does for rows with decode-time eviction (page and head granularity).

Per layer, after the stock kernel wrote the step's K/V: the row's queries join its request's
window (:class:`~vllm_kvevict.vllm.step.DecodeWindow`, the last ``window`` tokens' post-RoPE
queries) and, in a scoring step, the held tokens (the kept blocks in order, then the tail: what
the stock kernel attends) are scored with the request's policy on the host, exactly as the
reference engine does (:mod:`vllm_kvevict.reference.decode_eviction`); for h2o every step's
queries first add their attention over the held tokens to the window's running sums
(:meth:`~vllm_kvevict.vllm.step.DecodeWindow.add_attention`). Head granularity: each KV
head's held tokens are its compact region, then the positional tail (what
:mod:`.head_rows` attends), scored head by head on their positions
(:func:`~vllm_kvevict.policies.held.held_layer_scores`). A failure marks the window (that
eviction is skipped) and never reaches the engine.
"""

from __future__ import annotations

import torch

from vllm_kvevict.policies.base import LayerInputs
from vllm_kvevict.policies.held import held_layer_scores
from vllm_kvevict.vllm.backends.observe import guarded, scored
from vllm_kvevict.vllm.layouts import PagedLayout
from vllm_kvevict.vllm.step import DecodeRow, EvictionStep, HeadDecodeRow


def observe_decode_rows(step: EvictionStep, layer_name: str, layer_idx: int, query: torch.Tensor,
                        kv_cache: torch.Tensor, layout: PagedLayout, num_heads: int, scale: float,
                        unsupported: str = "") -> None:
    """Every row of ``step.decode`` for this layer (``query [tokens, H * d]``)."""
    for row in step.decode.values():
        observe = _observe_heads if isinstance(row, HeadDecodeRow) else _observe
        guarded(row, "decode-time scoring", "that eviction skipped", unsupported,
                lambda: observe(step, row, layer_name, layer_idx, query, kv_cache, layout, num_heads, scale))


def _row_queries(row, query: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """The row's queries ``[n, H, d]`` of the step's ``query [tokens, H * d]``."""
    return query.view(query.shape[0], num_heads, head_dim)[row.query_offset : row.query_offset + row.num_queries]


def _window_appended(row, layer_idx: int, query: torch.Tensor, num_heads: int, head_dim: int) -> bool:
    """Append the row's queries to its window; whether this step scores it (raises an injected fault)."""
    sink = row.sink
    sink.append(layer_idx, _row_queries(row, query, num_heads, head_dim))
    if not row.score or sink.error is not None:
        return False
    if sink.fault == "scoring":
        raise RuntimeError("injected scoring fault")
    return True


def _observe(step, row: DecodeRow, layer_name, layer_idx, query, kv_cache, layout, num_heads, scale) -> None:
    sink, summing = row.sink, row.policy.needs.attention_sums
    held = None
    if summing:  # h2o: every step's queries add their attention over the held tokens to the sums
        held = layout.gather(kv_cache, row.held_blocks, row.held_len)
        queries = _row_queries(row, query, num_heads, layout.head_dim).transpose(0, 1)
        sink.add_attention(layer_idx, queries.float().cpu(), held[0].float().cpu(), scale)
    if not _window_appended(row, layer_idx, query, num_heads, layout.head_dim):
        return
    keys, values = held if held is not None else layout.gather(kv_cache, row.held_blocks, row.held_len)
    inputs = LayerInputs(
        keys=keys.float().cpu(),
        values=values.float().cpu(),
        queries=sink.queries[layer_idx].transpose(0, 1).cpu(),
        positions=row.positions,
        o_proj=step.model.o_proj_of(layer_name).cpu() if row.policy.needs.o_proj else None,
        layer_idx=layer_idx,
        num_layers=step.model.num_layers,
        scale=scale,
        attention_sum=sink.attention_sum[layer_idx] if summing else None,
        budget_len=row.seq_len,
    )
    sink.scores[layer_idx] = scored(row.policy, inputs, layout.num_kv_heads, row.held_len)


def _observe_heads(step, row: HeadDecodeRow, layer_name, layer_idx, query, kv_cache, layout, num_heads,
                   scale) -> None:
    sink = row.sink
    if not _window_appended(row, layer_idx, query, num_heads, layout.head_dim):
        return
    tail_k, tail_v = layout.read_tail(kv_cache, row.tail_blocks, row.tail_start, row.seq_len)  # [T, Hkv, d]
    num_kv_heads = layout.num_kv_heads
    if row.region is None:
        keys, values = list(tail_k.transpose(0, 1)), list(tail_v.transpose(0, 1))
    else:
        region = row.region
        region_k, region_v = layout.read_region(kv_cache, region.block[layer_idx], region.plane[layer_idx],
                                                region.slot[layer_idx])
        lens = region.lens[layer_idx].tolist()
        keys = [torch.cat([k, tail_k[:, g]]) for g, k in enumerate(torch.split(region_k, lens))]
        values = [torch.cat([v, tail_v[:, g]]) for g, v in enumerate(torch.split(region_v, lens))]
    sink.scores[layer_idx] = held_layer_scores(
        row.policy, [k.float().cpu() for k in keys], [v.float().cpu() for v in values],
        row.held_positions(layer_idx, num_kv_heads), sink.queries[layer_idx].transpose(0, 1).cpu(), row.seq_len,
        layer_idx=layer_idx, num_layers=step.model.num_layers, scale=scale,
        o_proj=step.model.o_proj_of(layer_name).cpu() if row.policy.needs.o_proj else None)
