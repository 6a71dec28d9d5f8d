"""After a step's forward: decode-time recompactions (head granularity) of the rows scored this step.

For every :class:`~vllm_kvevict.vllm.step.HeadDecodeRow` with ``score``: each (layer, KV
head)'s kept positions among those it holds (:func:`~vllm_kvevict.policies.held.plan_held`,
the reference engine's call), head-pages assigned in the step's ``K'`` ordered blocks
(:func:`~vllm_kvevict.cache.plan_compaction`), and every kept entry copied there from where it
is held, the old compact region or the positional tail (:meth:`PagedLayout.compact_from`).
The request then attends the new region and its tail from ``seq_len``; the scheduler swaps the
blocks in and frees the old compact blocks and the consumed tail blocks. A failure gives the
ordered blocks back and leaves the request with what it holds (the copy only wrote fresh
blocks); it is counted and never reaches the engine.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from vllm_kvevict.cache import plan_compaction
from vllm_kvevict.policies.held import plan_held
from vllm_kvevict.vllm.step import CompactRegion, HeadDecodeRow
from vllm_kvevict.vllm.worker.failure import EvictionFailure, check_compaction, injected, layer_scores
from vllm_kvevict.vllm.worker.requests import HEAD

logger = logging.getLogger(__name__)


def finish_head_decode(row: HeadDecodeRow, state, unused: dict, block_size: int, caches, num_layers: int, done: Any,
                       recorder: Any = None) -> None:
    """Recompact ``row``'s request (``unused``: the step's orders not used yet; its own is taken)."""
    sink, config = row.sink, state.config
    order = unused.pop(row.req_id, None)
    started = time.perf_counter()
    try:
        if order is None or tuple(order) != row.compact_blocks:
            raise EvictionFailure("invariant", "scored without this step's compaction order")
        scores = layer_scores(sink, num_layers)
        num_kv_heads = scores[0].num_kv_heads
        held = [row.held_positions(layer, num_kv_heads) for layer in range(num_layers)]
        try:
            injected(sink, "selection")
            kept = plan_held(state.policy, scores, row.seq_len, held)
            plan = plan_compaction(kept, order, block_size, num_kv_heads)
        except EvictionFailure:
            raise
        except Exception as exc:
            raise EvictionFailure("selection", f"{type(exc).__name__}: {exc}") from exc
        try:
            for layer in range(num_layers):
                if sink.fault == "compaction" and layer == num_layers // 2:
                    raise RuntimeError("injected compaction fault")
                kv_cache, layout = caches(layer)
                layout.compact_from(kv_cache, held_sources(row, plan, layer, block_size), plan, layer)
        except Exception as exc:
            raise EvictionFailure("compaction", f"{type(exc).__name__}: {exc}") from exc
        check_compaction(kept, plan, row.seq_len, len(order))
    except Exception as exc:  # never into the engine core
        stage = exc.stage if isinstance(exc, EvictionFailure) else "selection"
        logger.warning("kvevict: decode-time recompaction of %s failed at %s, skipped: %s", row.req_id, stage, exc)
        done.report.head_failed.add(row.req_id)
        done.decode_failed[row.req_id] = (config.scorer, "head", stage)
        if recorder is not None:
            recorder.failures[row.req_id] = f"decode {stage}: {exc}"
    else:
        state.region = CompactRegion.from_plan(plan, row.seq_len)
        state.settle(HEAD)
        report = done.report
        report.decode_compacted[row.req_id] = kept.head_budgets.flatten().tolist()
        report.decode_count[row.req_id] = report.decode_count.get(row.req_id, 0) + 1
        report.passes[row.req_id] = (config.scorer, sink.seconds + time.perf_counter() - started)
        if recorder is not None:
            recorder.decode.setdefault(row.req_id, []).append(
                {"seq_len": row.seq_len, "held": held, "kept": kept.indices, "scores": scores,
                 "blocks": list(order), "tail_start": row.tail_start})
    done.report.generations[row.req_id] = state.admission.generation
    state.decode_from = row.seq_len
    sink.reset_scores()


def held_sources(row: HeadDecodeRow, plan, layer: int, block_size: int) -> tuple[torch.Tensor, ...]:
    """``(block, plane, slot)`` where each entry of ``plan.layer_gather(layer)`` is held now:
    in the positional tail (plane = its head) or in the head's compact region."""
    gather = plan.layer_gather(layer)
    head, pos = gather.head, gather.src_positions
    block = torch.empty_like(pos)
    plane, slot = head.clone(), pos % block_size
    in_tail = pos >= row.tail_start
    block[in_tail] = row.tail_blocks[pos[in_tail] // block_size - row.first_tail_block]
    in_region = ~in_tail
    if bool(in_region.any()):
        region = row.region
        if region is None:
            raise ValueError("a kept position before the tail of a request without a compact region")
        lens = region.lens[layer]
        region_head = torch.repeat_interleave(torch.arange(lens.numel()), lens)
        key = region_head * row.seq_len + region.positions[layer]  # ascending: by head, then position
        wanted = head[in_region] * row.seq_len + pos[in_region]
        idx = torch.searchsorted(key, wanted).clamp(max=max(key.numel() - 1, 0))
        if key.numel() == 0 or not bool(torch.equal(key[idx], wanted)):
            raise ValueError(f"layer {layer}: a kept position is in neither the compact region nor the tail")
        block[in_region] = region.block[layer][idx]
        plane[in_region] = region.plane[layer][idx]
        slot[in_region] = region.slot[layer][idx]
    return block, plane, slot
