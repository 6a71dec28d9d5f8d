"""After a step's forward: decode-time evictions of the rows scored this step (head granularity's
recompactions: :mod:`.head_decode`).

For every :class:`~vllm_kvevict.vllm.step.DecodeRow` with ``score``: the held blocks to drop,
``policy.evicted_blocks(scores, held_len, budget=config.budget_tokens(seq_len))`` (the reference
engine's call, :mod:`vllm_kvevict.reference.decode_eviction`), mapped back to positional block
indices; they join the request's evicted set (the planner's tables skip them from the next step
on) and are reported, so that the scheduler frees them. A failure skips that eviction (the
request keeps what it holds, the next one comes ``decode_interval`` tokens later), is counted,
and never reaches the engine.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import torch

from vllm_kvevict.vllm.step import EvictionStep, HeadDecodeRow
from vllm_kvevict.vllm.worker.failure import EvictionFailure, injected, layer_scores
from vllm_kvevict.vllm.worker.head_decode import finish_head_decode
from vllm_kvevict.vllm.worker.requests import HEAD, PAGE, RequestTable

logger = logging.getLogger(__name__)


def start_attention_sums(state, sink, evicted: list[int], chunk_end: int, block_size: int, num_layers: int) -> None:
    """h2o: hand the prompt's attention sums ``sink.attention_sum`` of the tokens it keeps (those
    of blocks not ``evicted``) to the request's decode window, when it evicts during decode.
    ``chunk_end``: where the prompt's last chunk ended (past the prompt after a preemption)."""
    if state.decode is None or not state.policy.needs.attention_sums:
        return
    prompt_len = state.prompt_len
    missing = [layer for layer in range(num_layers) if layer not in sink.attention_sum]
    if sink.error is not None or missing:
        raise EvictionFailure("scoring", sink.error or f"no prompt attention sums for layers {missing}")
    positions = torch.arange(prompt_len)
    kept = positions[~torch.isin(positions // block_size, torch.tensor(evicted, dtype=torch.long))]
    state.decode.start_sums(sink.attention_sum, kept, extra=max(0, chunk_end - prompt_len))


def finish_decode(step: Optional[EvictionStep], table: RequestTable, num_layers: int, done: Any,
                  recorder: Any = None, orders: Optional[dict] = None, block_size: int = 0, caches: Any = None) -> None:
    """Evict every row of ``step.decode`` scored this step; results go into ``done``
    (a :class:`~vllm_kvevict.vllm.worker.finish.FinishedStep`). ``orders``: the step's
    compaction orders not used yet (head rows take theirs), ``caches``: layer -> (cache, layout)."""
    for row in (step.decode.values() if step else ()):
        if not row.score:
            continue
        state = table.get(row.req_id)
        if state is None or state.decode is not row.sink or state.status not in (PAGE, HEAD):
            continue
        if isinstance(row, HeadDecodeRow):
            finish_head_decode(row, state, orders if orders is not None else {}, block_size, caches, num_layers, done,
                               recorder)
            continue
        if state.status != PAGE:
            continue
        sink, config = row.sink, state.config
        started = time.perf_counter()
        try:
            scores = layer_scores(sink, num_layers)
            injected(sink, "selection")
            try:
                chosen = state.policy.evicted_blocks(scores, row.held_len, budget=config.budget_tokens(row.seq_len))
            except Exception as exc:
                raise EvictionFailure("selection", f"{type(exc).__name__}: {exc}") from exc
            last = row.held_index.numel() - 1
            if sorted(set(chosen)) != list(chosen) or (chosen and not 0 <= chosen[0] <= chosen[-1] < last):
                raise EvictionFailure("invariant",
                                      f"evicted held blocks {chosen} are not sorted full blocks before {last}")
            evicted = row.held_index[torch.tensor(chosen, dtype=torch.long)].tolist() if chosen else []
            sink.drop_blocks(list(chosen), block_size)  # h2o: the evicted tokens' sums go with them
            if recorder is not None:
                recorder.decode.setdefault(row.req_id, []).append(
                    {"seq_len": row.seq_len, "held_blocks": row.held_index.tolist(), "evicted": evicted,
                     "scores": scores})
            state.evicted = torch.tensor(sorted(set(state.evicted.tolist()) | set(evicted)), dtype=torch.long)
            report = done.report  # every pass is reported (counted), with its blocks if any
            report.decode_evicted[row.req_id] = sorted(set(report.decode_evicted.get(row.req_id, [])) | set(evicted))
            report.decode_count[row.req_id] = report.decode_count.get(row.req_id, 0) + 1
            report.generations[row.req_id] = state.admission.generation
            report.passes[row.req_id] = (config.scorer, sink.seconds + time.perf_counter() - started)
        except Exception as exc:  # never into the engine core
            stage = exc.stage if isinstance(exc, EvictionFailure) else "selection"
            logger.warning("kvevict: decode-time eviction of %s failed at %s, skipped: %s", row.req_id, stage, exc)
            done.decode_failed[row.req_id] = (config.scorer, "page", stage)
            if recorder is not None:
                recorder.failures[row.req_id] = f"decode {stage}: {exc}"
        state.decode_from = row.seq_len
        sink.reset_scores()
