"""After a step's forward: turn every scored request's observations into its eviction.

Page granularity: the evicted positional blocks (the scheduler nulls and frees them). Head
granularity: each (layer, KV head)'s kept tokens, copied into the head-pages of the ``K`` blocks
the scheduler took for this step (:class:`~vllm_kvevict.vllm.layouts.PagedLayout.compact`).
Every compaction order of the step ends as either *compacted* or *failed* (its blocks go back):
none can outlive the step. A failure leaves the request whole and is reported, never raised.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch

from vllm_kvevict.cache import plan_compaction
from vllm_kvevict.vllm.channel import KVEvictWorkerMetadata
from vllm_kvevict.vllm.step import CompactRegion, EvictionStep
from vllm_kvevict.vllm.worker.decode import finish_decode, start_attention_sums
from vllm_kvevict.vllm.worker.failure import (  # noqa: F401 (STAGES re-exported)
    STAGES,
    EvictionFailure,
    check_compaction,
    injected,
    layer_scores,
)
from vllm_kvevict.vllm.worker.requests import HEAD, WHOLE, RequestTable

logger = logging.getLogger(__name__)


@dataclass
class FinishedStep:
    """What the step's evictions did: the report for the scheduler, and for the metrics."""

    report: KVEvictWorkerMetadata = field(default_factory=KVEvictWorkerMetadata)
    #: request id -> (scorer, granularity, scoring seconds) of every request scored this step
    #: (the attention layers' part; :attr:`Observations.total_seconds` is the whole pass).
    scored: dict[str, tuple[str, str, float]] = field(default_factory=dict)
    #: request id -> (scorer, granularity, stage) of requests whose eviction failed (left whole).
    failed: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    #: requests scored with nothing worth evicting (page: no block; head: no compaction order).
    nothing_evicted: set[str] = field(default_factory=set)
    #: request id -> (scorer, granularity, stage) of decode-time evictions that failed (skipped).
    decode_failed: dict[str, tuple[str, str, str]] = field(default_factory=dict)


#: ``layer index -> (its KV cache tensor, its PagedLayout)``.
CacheLookup = Callable[[int], tuple[torch.Tensor, Any]]




def finish_step(step: Optional[EvictionStep], table: RequestTable, orders: Mapping[str, list[int]], block_size: int,
                caches: CacheLookup, recorder: Any = None) -> FinishedStep:
    """Evict every request scored in ``step``; ``orders``: this step's compaction orders."""
    done = FinishedStep()
    unused = dict(orders)
    for row in (step.observe.values() if step else ()):
        if not row.score:
            if row.start + row.num_queries >= row.prompt_len:  # prompt_eviction "off" (h2o): whole
                _keep_prompt(row, table, block_size, step.model.num_layers, done, recorder)
            continue
        state = table.get(row.req_id)
        if state is None or state.observations is not row.sink:
            continue
        config = state.config
        labels = (config.scorer, config.resolved_granularity)
        sink = state.observations
        started = time.perf_counter()
        try:
            scores = layer_scores(sink, step.model.num_layers)
            if recorder is not None:
                recorder.scores[row.req_id] = scores
            if config.resolved_granularity == "head":
                order = unused.pop(row.req_id, None)
                if order is None:  # compaction would not release more blocks than it takes, or no room
                    _keep_whole(state)
                    done.nothing_evicted.add(row.req_id)
                else:
                    _compact(row.req_id, state, scores, order, block_size, caches, done, recorder)
            else:
                _evict_pages(row.req_id, state, scores, block_size, done, recorder, row.start + row.num_queries)
        except Exception as exc:  # never into the engine core
            stage = exc.stage if isinstance(exc, EvictionFailure) else "selection"
            logger.warning("kvevict: eviction of %s failed at %s, request left whole: %s", row.req_id, stage, exc)
            logger.debug("kvevict: eviction failure", exc_info=exc)
            state.settle(WHOLE)
            done.failed[row.req_id] = (*labels, stage)
            if recorder is not None:
                recorder.failures[row.req_id] = f"{stage}: {exc}"
        sink.selection_seconds += time.perf_counter() - started - sink.compaction_seconds
        done.scored[row.req_id] = (*labels, sink.seconds)
        done.report.generations[row.req_id] = state.admission.generation
        done.report.passes[row.req_id] = (config.scorer, sink.total_seconds)
        if recorder is not None:
            recorder.seconds[row.req_id] = {"scoring": sink.seconds, "selection": sink.selection_seconds,
                                            "compaction": sink.compaction_seconds}
    if step is not None and step.decode:
        finish_decode(step, table, step.model.num_layers, done, recorder, unused, block_size, caches)
    for req_id in unused:  # not compacted this step (not scored, left whole, or failed)
        done.report.head_failed.add(req_id)
        state = table.get(req_id)
        if state is not None:
            done.report.generations[req_id] = state.admission.generation
    return done


def _keep_whole(state) -> None:
    """A head-granular prompt left whole: positional (nothing evicted) when it evicts during
    decode, so its first interval recompacts it (the scheduler marks it the same way), else
    whole."""
    if state.decode is not None:
        state.settle_pages()
    else:
        state.settle(WHOLE)


def _keep_prompt(row, table: RequestTable, block_size: int, num_layers: int, done: FinishedStep,
                 recorder: Any) -> None:
    """A prompt kept whole that was observed for h2o's attention sums: positional (nothing
    evicted) with its sums in its decode window, or whole if observing them failed (not evicted
    during decode either, as after a failed prompt eviction)."""
    state = table.get(row.req_id)
    if state is None or state.observations is not row.sink:
        return
    try:
        start_attention_sums(state, row.sink, [], row.start + row.num_queries, block_size, num_layers)
    except EvictionFailure as exc:
        logger.warning("kvevict: attention sums of %s's prompt failed, request left whole: %s", row.req_id, exc)
        state.settle(WHOLE)
        done.decode_failed[row.req_id] = (state.config.scorer, "page", exc.stage)
        if recorder is not None:
            recorder.failures[row.req_id] = f"prompt sums {exc.stage}: {exc}"
        return
    state.settle_pages()


def _evict_pages(req_id: str, state, scores, block_size: int, done: FinishedStep, recorder: Any,
                 chunk_end: int = 0) -> None:
    sink = state.observations
    try:
        injected(sink, "selection")
        evicted = state.policy.evicted_blocks(scores, state.prompt_len)
    except EvictionFailure:
        raise
    except Exception as exc:
        raise EvictionFailure("selection", f"{type(exc).__name__}: {exc}") from exc
    injected(sink, "invariant")
    last_block = (state.prompt_len - 1) // block_size
    if sorted(set(evicted)) != list(evicted) or (evicted and not 0 <= evicted[0] <= evicted[-1] < last_block):
        raise EvictionFailure("invariant", f"evicted blocks {evicted} are not sorted full blocks before {last_block}")
    start_attention_sums(state, sink, list(evicted), chunk_end, block_size, len(scores))  # h2o during decode
    state.settle_pages(evicted)
    done.report.evicted[req_id] = evicted
    if not evicted:
        done.nothing_evicted.add(req_id)
    if recorder is not None:
        recorder.evicted[req_id] = evicted


def _compact(req_id: str, state, scores, block_ids: list[int], block_size: int, caches: CacheLookup,
             done: FinishedStep, recorder: Any) -> None:
    """Head granularity: plan, copy every layer's kept K/V into the head-pages of ``block_ids``,
    check the result; any failure gives the blocks back (and is raised to the caller)."""
    sink = state.observations
    try:
        try:
            injected(sink, "selection")
            kept = state.policy.plan_head(scores, state.prompt_len)
            plan = plan_compaction(kept, block_ids, block_size, kept.head_budgets.shape[1])
        except EvictionFailure:
            raise
        except Exception as exc:
            raise EvictionFailure("selection", f"{type(exc).__name__}: {exc}") from exc
        copy_started = time.perf_counter()
        try:
            if sink.source_blocks is None:
                raise RuntimeError("compaction sources not seen in the scoring step")
            copies = None  # every layer's copy list, checked once (each layer's cache has the same shape)
            for layer in range(plan.num_layers):
                if layer == plan.num_layers // 2:
                    injected(sink, "compaction")  # a copy that breaks off half-way
                kv_cache, layout = caches(layer)
                if copies is None:
                    copies = layout.plan_copies(kv_cache, sink.source_blocks, plan)
                layout.compact(kv_cache, sink.source_blocks, plan, layer, copies)
        except EvictionFailure:
            raise
        except Exception as exc:
            raise EvictionFailure("compaction", f"{type(exc).__name__}: {exc}") from exc
        injected(sink, "invariant")
        check_compaction(kept, plan, state.prompt_len, len(block_ids))
        try:
            artifact = state.policy.vector_artifact() if plan.key_only is not None else None
            region = CompactRegion.from_plan(plan, state.prompt_len, artifact)
        except Exception as exc:
            raise EvictionFailure("invariant", f"{type(exc).__name__}: {exc}") from exc
        sink.compaction_seconds += time.perf_counter() - copy_started
    except Exception:
        done.report.head_failed.add(req_id)
        raise
    if recorder is not None:
        recorder.kept[req_id] = kept
    state.region = region
    state.settle(HEAD)
    done.report.head_compacted[req_id] = kept.head_budgets.flatten().tolist()
