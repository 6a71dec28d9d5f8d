"""One step's :class:`~vllm_kvevict.vllm.step.EvictionStep`, from the request table and the batch.

Per batch row: a compacted request attends its compact region + tail (and the stock kernel
gets its tail only); a page-evicted request's table drops its evicted blocks; a request whose
prompt is being prefilled is observed (window queries, statistics) and, in the chunk that
completes the prompt, scored; a request with decode-time eviction adds its queries to its window
and, every ``decode_interval`` tokens, has its held tokens scored (page granularity: when the
worker counts the interval reached; head granularity: when the scheduler ordered the blocks to
recompact into, ``orders``). Everything is
read from the runner's CPU-side batch (block table, offsets), so nothing here reads a device
tensor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

from vllm_kvevict.vllm import block_tables
from vllm_kvevict.vllm.model_info import ModelInfo
from vllm_kvevict.vllm.step import DecodeRow, EvictionStep, HeadDecodeRow, HeadRow, RowObservation, TableRow
from vllm_kvevict.vllm.worker.requests import HEAD, OBSERVING, PAGE, RequestTable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchRow:
    """One row of the runner's batch this step."""

    req_id: str
    num_computed: int
    num_queries: int
    #: index of the row's first query token in the step's flattened batch.
    query_offset: int
    #: the row's positional block ids (first KV-cache group), from the CPU block table.
    block_ids: torch.Tensor


def plan_step(table: RequestTable, rows: Sequence[BatchRow], block_size: int, model: ModelInfo,
              orders: Optional[Mapping[str, list[int]]] = None) -> EvictionStep:
    """``orders``: this step's compaction orders (request id -> compact block ids)."""
    orders = orders or {}
    observe: dict[int, RowObservation] = {}
    head_rows: dict[int, HeadRow] = {}
    table_rows: dict[int, TableRow] = {}
    decode: dict[int, DecodeRow] = {}
    for row, batch_row in enumerate(rows):
        state = table.get(batch_row.req_id)
        if state is None:
            continue
        seq_len = batch_row.num_computed + batch_row.num_queries
        restarted = batch_row.num_computed < (state.observed_until if state.status == OBSERVING else state.prompt_len)
        if restarted:  # its blocks are new, yet the scheduler sent no reset: never trust old state
            logger.warning("kvevict: %s restarted without a reset; left whole", batch_row.req_id)
            table.drop([batch_row.req_id])
            continue
        if state.status == HEAD:
            region = state.region
            head_rows[row] = HeadRow(batch_row.req_id, region, batch_row.query_offset, batch_row.num_queries,
                                     seq_len, batch_row.block_ids[region.first_tail_block :].long())
            table_rows[row] = block_tables.tail_row(batch_row.block_ids, seq_len, region.first_tail_block, block_size)
            if state.decode is not None:
                decode[row] = _head_decode_row(state, batch_row, seq_len, orders.get(batch_row.req_id))
        elif state.status == PAGE:
            if state.evicted.numel():
                table_rows[row] = block_tables.page_row(batch_row.block_ids, seq_len, state.evicted, block_size)
            if state.decode is not None and state.config.resolved_granularity == "head":  # still positional
                decode[row] = _head_decode_row(state, batch_row, seq_len, orders.get(batch_row.req_id))
            elif state.decode is not None:
                decode[row] = _decode_row(state, batch_row, seq_len, block_size)
        elif state.status == OBSERVING and batch_row.num_computed < state.prompt_len:
            if state.observations is None:  # prompt_eviction "off": the prompt stays whole
                state.observed_until = seq_len
                if seq_len >= state.prompt_len:
                    state.settle_pages()
                continue
            observation = _observation(state, batch_row, seq_len, block_size)
            if observation is not None:
                observe[row] = observation
    return EvictionStep(observe=observe, head_rows=head_rows, table_rows=table_rows, model=model, decode=decode)


def _decode_row(state, batch_row: BatchRow, seq_len: int, block_size: int) -> DecodeRow:
    """Decode-time eviction's row: its queries join the window; scored once ``decode_interval``
    tokens were run since the last eviction and the window is full."""
    window = state.decode
    window.observed += batch_row.num_queries
    score = seq_len - state.decode_from >= state.config.decode_interval and window.observed >= window.window
    used = min(batch_row.block_ids.numel(), -(-seq_len // block_size))
    keep = torch.ones(used, dtype=torch.bool)
    keep[state.evicted[state.evicted < used]] = False
    held_index = torch.arange(used)[keep]
    positions = (held_index.view(-1, 1) * block_size + torch.arange(block_size).view(1, -1)).view(-1)
    positions = positions[positions < seq_len]
    return DecodeRow(batch_row.req_id, batch_row.query_offset, batch_row.num_queries, seq_len, score,
                     batch_row.block_ids[:used][keep].long().clone(), held_index, positions, window, state.policy)


def _head_decode_row(state, batch_row: BatchRow, seq_len: int, order: Optional[list[int]]) -> HeadDecodeRow:
    """Head granularity's decode row: scored when the scheduler ordered this step's compact
    blocks (it counts the interval) and the window is full."""
    window = state.decode
    window.observed += batch_row.num_queries
    region = state.region if state.status == HEAD else None
    first_tail = region.first_tail_block if region is not None else 0
    score = order is not None and window.observed >= window.window
    return HeadDecodeRow(batch_row.req_id, batch_row.query_offset, batch_row.num_queries, seq_len, score, region,
                         batch_row.block_ids[first_tail:].long().clone(), tuple(order or ()), window, state.policy)


def _observation(state, batch_row: BatchRow, seq_len: int, block_size: int):
    """What to observe of a prefill chunk (``None`` if nothing)."""
    config, needs, prompt_len = state.config, state.policy.needs, state.prompt_len
    start, end = batch_row.num_computed, min(seq_len, prompt_len)
    state.observed_until = seq_len
    w_lo, w_hi = max(start, prompt_len - config.window), end if config.evicts_prompt else 0
    collect = (0, 0)
    if needs.query_stats or needs.attention_sums:
        first = config.resolved_sinks if needs.query_stats else 0
        c_lo = max(start, first)
        if end > c_lo:
            collect = (c_lo - start, end - start)
    score = seq_len >= prompt_len and config.evicts_prompt  # "off" (h2o): its attention sums only
    window = (w_lo - start, w_hi - start) if w_hi > w_lo else (0, 0)
    if not (score or window[1] > window[0] or collect[1] > collect[0]):
        return None
    blocks = batch_row.block_ids[: -(-(prompt_len if score else end) // block_size)].long().clone()
    if score:
        state.observations.source_blocks = blocks[: -(-prompt_len // block_size)]
    return RowObservation(batch_row.req_id, batch_row.query_offset, batch_row.num_queries, start, window, collect,
                          score, blocks, state.observations)
