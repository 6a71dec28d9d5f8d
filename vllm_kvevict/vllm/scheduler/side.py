"""The scheduler half of our KV connector: admissions out, eviction reports in, blocks moved.

* :meth:`SchedulerSide.build_metadata` (every schedule): requests to forget, the resolved
  policy of every request admitted this step (new or resumed), and, for head-granular requests
  whose prompt completes this step, their ``K`` compact blocks taken from the pool (an order);
  with decode-time eviction, ``K'`` fresh blocks in the step whose length reaches
  ``decode_interval`` tokens past the last eviction (:mod:`.recompaction`).
* :meth:`SchedulerSide.apply_report` (every model output): page evictions (after the prompt, and
  decode-time ones every ``decode_interval`` tokens) null and free the evicted blocks;
  compactions swap the compact blocks in and free the positional ones (decode-time ones: the old
  compact blocks and the consumed tail blocks); failed orders give their blocks back. Reports about an earlier admission are stale and dropped.
* Metrics of what reached vLLM's pool are recorded here, once per request eviction.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

from vllm_kvevict.cache import ideal_blocks
from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.vllm.channel import Admission, KVEvictConnectorMetadata, KVEvictWorkerMetadata
from vllm_kvevict.vllm.metrics import HeldTokens, requested_labels
from vllm_kvevict.vllm.request_policy import extra_args_of
from vllm_kvevict.vllm.scheduler.blocks import (
    blocks_released_by_compaction,
    evict_blocks,
    held_block_count,
    install_compact_blocks,
    release_blocks,
    take_compact_blocks,
)
from vllm_kvevict.vllm.scheduler.recompaction import Recompactions
from vllm_kvevict.vllm.scheduler.state import PendingCompaction, SchedulerEvictionState, attach_state

logger = logging.getLogger(__name__)


class SchedulerSide:
    def __init__(self, server_default: EvictionConfig, stats: Any, num_layers: int, num_kv_heads: int) -> None:
        self.state = SchedulerEvictionState(server_default)
        self.stats = stats  # metrics.EvictionStatsRecorder
        self.held = HeldTokens()
        self.num_layers, self.num_kv_heads = num_layers, num_kv_heads
        self.manager: Any = None
        #: request id -> how many times it was admitted (new or resumed).
        self._generation: dict[str, int] = {}
        #: request id -> scheduler ``Request`` of every admitted, unfinished request.
        self._requests: dict[str, Any] = {}
        #: fault-injection tests set it: the ``extra_args`` key naming the stage at which a
        #: request's eviction is to fail (``scoring``, ``selection``, ``compaction``, ``invariant``).
        self.fault_key: Optional[str] = None
        #: head granularity with decode-time eviction: when to order, and what each request holds.
        self.recompactions = Recompactions()

    def bind(self, kv_cache_manager: Any) -> None:
        self.manager = kv_cache_manager
        attach_state(kv_cache_manager, self.state)

    @property
    def block_size(self) -> int:
        from vllm_kvevict.vllm.compat import active

        return active().single_manager(self.manager).block_size

    # ----------------------------------------------------------------- admission
    def note_allocation(self, request: Any) -> None:
        """Every allocation of a waiting request: remember it; on its first admission, count it
        as ``opted_out`` when its policy leaves it whole, ``decode_only`` when it keeps its
        prompt whole and evicts only during decode (its prompt has no other fate to count)."""
        self._requests[request.request_id] = request
        if request.request_id in self._generation:
            return  # resumed after preemption: counted already
        try:
            config = self.state.config_for(request)
            if config is None:
                labels = requested_labels(extra_args_of(request), self.state.server_default)
                self.stats.record_outcome(*labels, "opted_out")
            elif config.evicts_during_decode and not config.evicts_prompt:
                self.stats.record_outcome(config.scorer, config.resolved_granularity, "decode_only")
        except Exception as exc:  # metrics never break scheduling
            logger.debug("kvevict: admission not counted: %s", exc)

    def build_metadata(self, scheduler_output: Any) -> KVEvictConnectorMetadata:
        finished = set(scheduler_output.finished_req_ids or ())
        preempted = set(scheduler_output.preempted_req_ids or ())
        admitted = {r.req_id for r in scheduler_output.scheduled_new_reqs}
        admitted |= set(scheduler_output.scheduled_cached_reqs.resumed_req_ids or ())
        reset = finished | admitted | preempted
        for req_id in finished:
            self._generation.pop(req_id, None)
        for req_id in finished | preempted:
            self.held.release(req_id)
        self.recompactions.forget(reset)
        self.state.forget(reset)
        for req_id in reset:
            self._release_pending(req_id)
        admissions = {}
        for req_id in admitted:
            self._generation[req_id] = self._generation.get(req_id, 0) + 1
            request = self._requests.get(req_id)
            config = self.state.config_for(request) if request is not None else None
            if config is not None:
                fault = (extra_args_of(request) or {}).get(self.fault_key) if self.fault_key else None
                admissions[req_id] = Admission(config, int(request.num_prompt_tokens), self._generation[req_id], fault)
                self.recompactions.admit(req_id, config, int(request.num_prompt_tokens))
        return KVEvictConnectorMetadata(reset_req_ids=reset, admissions=admissions,
                                        compact_orders=self._order_compactions(scheduler_output))

    def _order_compactions(self, scheduler_output: Any) -> dict[str, list[int]]:
        """``K`` compact blocks for every head-granular request whose prompt completes in this
        step (it is scored, then compacted after the forward)."""
        if self.manager is None or not self._requests:
            return {}
        computed = {r.req_id: r.num_computed_tokens for r in scheduler_output.scheduled_new_reqs}
        cached = scheduler_output.scheduled_cached_reqs
        computed.update(zip(cached.req_ids, cached.num_computed_tokens))
        orders = {}
        for req_id, num_scheduled in scheduler_output.num_scheduled_tokens.items():
            request, done = self._requests.get(req_id), computed.get(req_id)
            if request is None or done is None:
                continue
            prompt_len = request.num_prompt_tokens
            cfg = self.state.known_config(req_id)
            if cfg is None or cfg.resolved_granularity != "head" or req_id in self.state.pending_compactions:
                continue
            if prompt_len <= done:  # decoding: a decode-time recompaction, every decode_interval tokens
                order = self._order_recompaction(req_id, cfg, done + num_scheduled)
                if order is not None:
                    orders[req_id] = order
                continue
            if not prompt_len <= done + num_scheduled or not cfg.evicts_prompt:
                continue
            k, released = blocks_released_by_compaction(cfg, prompt_len, self.block_size, self.num_layers,
                                                        self.num_kv_heads)
            blocks = take_compact_blocks(self.manager, req_id, k) if k < released else None
            if blocks is None:  # left whole: nothing to gain, or no room in the pool
                self.recompactions.kept_whole(req_id)  # the worker keeps it positional
                continue
            self.state.pending_compactions[req_id] = PendingCompaction(blocks, released, self._generation.get(req_id, 0))
            self.state.frozen.add(req_id)  # tokens from here on attend a compacted context
            orders[req_id] = [b.block_id for b in blocks]
        return orders

    def _order_recompaction(self, req_id: str, cfg: EvictionConfig, seq_len: int) -> Optional[list[int]]:
        """``K'`` fresh blocks for a decode-time recompaction at ``seq_len``, or ``None``."""
        k = self.recompactions.due(req_id, cfg, seq_len, self.block_size, self.num_layers, self.num_kv_heads)
        if k is None:
            return None
        blocks = take_compact_blocks(self.manager, req_id, k)
        if blocks is None:
            return None  # no room in the pool: tried again next step
        self.recompactions.ordered(req_id, seq_len)
        self.state.pending_compactions[req_id] = PendingCompaction(blocks, seq_len // self.block_size,
                                                                   self._generation.get(req_id, 0), decode=True)
        self.state.frozen.add(req_id)  # tokens from here on attend a compacted context
        return [b.block_id for b in blocks]

    # ----------------------------------------------------------------- reports
    def apply_report(self, report: Optional[KVEvictWorkerMetadata]) -> None:
        if report is None or self.manager is None:
            return
        current = lambda req_id: report.generations.get(req_id) == self._generation.get(req_id)  # noqa: E731
        for req_id in report.head_failed:
            self._release_pending(req_id)
        for req_id, kept_per_head in report.head_compacted.items():
            if current(req_id):
                self._install(req_id, kept_per_head, report.passes.get(req_id, ("other", 0.0))[1])
        for req_id, blocks in report.evicted.items():
            # With async scheduling a request can be preempted (blocks freed) and re-admitted
            # before the output that evicted its pages is processed: that report is stale.
            if blocks and current(req_id):
                self._evict_pages(req_id, blocks, *report.passes.get(req_id, ("other", 0.0)))
        recompacted = {req_id: self._install_recompaction(req_id, kept)
                       for req_id, kept in report.decode_compacted.items() if current(req_id)}
        for req_id, count in report.decode_count.items():
            if current(req_id):
                self._evict_decoded(req_id, report.decode_evicted.get(req_id, []), count, recompacted.get(req_id))

    def _free(self, req_id: str, blocks: list[int], what: str) -> Optional[int]:
        """Give ``blocks`` of ``req_id`` back to the pool; the count returned (``None`` if freeing
        failed: logged and counted). A request that returned blocks is frozen (what it fills
        from now on never enters the prefix cache)."""
        try:
            returned = evict_blocks(self.manager, req_id, blocks)
        except Exception as exc:
            logger.error("kvevict: could not free %s blocks of %s: %s", what, req_id, exc)
            self.stats.record_error("free")
            return None
        if returned:
            self.state.frozen.add(req_id)
        self.state.blocks_returned += returned
        return returned

    def _evict_decoded(self, req_id: str, blocks: list[int], evictions: int, recompacted: Optional[int] = None) -> None:
        """Decode-time evictions: the held blocks the worker stopped reading go back to the pool
        (head granularity: ``recompacted``, the blocks its recompaction returned, already freed)."""
        if recompacted is not None:
            cfg = self.state.known_config(req_id)
            self.stats.record_decode_evictions(cfg.scorer if cfg is not None else "other", evictions, recompacted, "head")
            return
        returned = self._free(req_id, blocks, "decode-evicted") if blocks else 0
        if returned is None:
            return
        cfg = self.state.known_config(req_id)
        policy = cfg.scorer if cfg is not None else "other"
        self.stats.record_blocks_returned(returned)
        self.stats.record_decode_evictions(policy, evictions, returned)
        request = self._requests.get(req_id)
        if request is not None and blocks:
            self.held.hold(request, policy, "page", len(blocks) * self.block_size)

    def _evict_pages(self, req_id: str, blocks: list[int], policy: str, seconds: float) -> None:
        returned = self._free(req_id, blocks, "evicted")
        if returned is None:
            return
        block_size = self.block_size
        self.stats.record(policy, "page", len(blocks) * block_size, len(blocks), seconds)
        self.stats.record_blocks_returned(returned)
        request = self._requests.get(req_id)
        if request is None:
            return
        logical = int(request.num_prompt_tokens)
        evicted = len(blocks) * block_size
        kept = max(0, logical - evicted)
        held = held_block_count(self.manager, req_id)
        self.stats.record_memory(policy, "page", math.ceil(kept / block_size), held, logical, kept)
        self.stats.record_head_budgets(policy, "page", [kept] * (self.num_layers * self.num_kv_heads))
        self.held.hold(request, policy, "page", evicted)

    def _install_recompaction(self, req_id: str, kept_per_head: list[int]) -> int:
        """A decode-time recompaction done: its blocks in, the old compact blocks and the consumed
        tail blocks back to the pool; the blocks it returned, net of those it took (0 if none)."""
        pending = self.state.pending_compactions.pop(req_id, None)
        if pending is None or not pending.decode:
            if pending is not None:
                self.state.pending_compactions[req_id] = pending
            return 0
        released = install_compact_blocks(self.manager, req_id, pending)
        if released is None:
            release_blocks(self.manager, pending.blocks)
            return 0
        returned = max(0, released - len(pending.blocks))
        self.state.blocks_returned += returned
        self.stats.record_blocks_returned(returned)
        cfg = self.state.known_config(req_id)
        policy = cfg.scorer if cfg is not None else "other"
        self.stats.record_head_budgets(policy, "head", kept_per_head)
        request = self._requests.get(req_id)
        evicted = self.recompactions.installed(req_id, kept_per_head)
        if request is not None:
            self.held.hold(request, policy, "head", evicted)
        return returned

    def _install(self, req_id: str, kept_per_head: list[int], seconds: float) -> None:
        pending = self.state.pending_compactions.pop(req_id, None)
        if pending is None:
            return
        released = install_compact_blocks(self.manager, req_id, pending)
        if released is None:
            release_blocks(self.manager, pending.blocks)
            return
        returned = released - len(pending.blocks)
        self.state.blocks_returned += returned
        cfg = self.state.known_config(req_id)
        policy = cfg.scorer if cfg is not None else "other"
        request = self._requests.get(req_id)
        prompt_len = int(request.num_prompt_tokens) if request is not None else 0
        # token-equivalents: prompt tokens minus the mean kept per (layer, KV head)
        kept_tokens = sum(kept_per_head) / max(1, len(kept_per_head))
        evicted_tokens = max(0, round(prompt_len - kept_tokens))
        self.stats.record(policy, "head", evicted_tokens, max(0, returned), seconds)
        self.stats.record_blocks_returned(returned)
        self.stats.record_head_budgets(policy, "head", kept_per_head)
        if request is None or cfg is None:
            return
        held = held_block_count(self.manager, req_id)
        ideal = ideal_blocks(cfg, prompt_len, int(request.num_tokens), self.block_size)
        self.stats.record_memory(policy, "head", ideal, held, prompt_len, round(kept_tokens))
        self.held.hold(request, policy, "head", evicted_tokens)
        self.recompactions.compacted(req_id, kept_tokens, prompt_len)

    # ----------------------------------------------------------------- end of a request
    def request_finished(self, req_id: str) -> None:
        self._generation.pop(req_id, None)
        self.recompactions.forget([req_id])
        self._release_pending(req_id)
        self.state.finished(req_id)
        self.held.release(req_id)
        self._requests.pop(req_id, None)

    def _release_pending(self, req_id: str) -> None:
        pending = self.state.pending_compactions.pop(req_id, None)
        if pending is not None and self.manager is not None:
            release_blocks(self.manager, pending.blocks)
