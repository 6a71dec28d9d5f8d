"""The KV-connector channel between the scheduler and the workers (nothing is transferred).

* scheduler -> worker (:class:`KVEvictConnectorMetadata`): requests whose blocks changed under
  them (finished, preempted, resumed), so the worker drops their eviction state;
* worker -> scheduler (:class:`KVEvictWorkerMetadata`): ``{req_id: evicted positional block
  indices}`` chosen after the request's last prefill chunk; the scheduler side nulls them in the
  request's block list and frees them (:func:`manager.evict_blocks`);
* metrics: ``kvevict_*`` through the connector's stats (``EvictionMetricsMixin``, metrics.py).

Configured automatically when ``additional_config`` holds ``kv_eviction`` (see
:mod:`vllm_kvevict.vllm.compat.v0_32`), or by hand::

    --kv-transfer-config '{"kv_connector": "KVEvictConnector", "kv_role": "kv_both",
                           "kv_connector_module_path": "vllm_kvevict.vllm.connector"}'

Tensor parallelism: each rank scores its own KV heads, so ranks could choose different pages;
the metadata merge below keeps rank 0's choice only if all agree (not verified: TP > 1 is not
supported yet).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.vllm.manager import SchedulerEvictionState, attach_state, evict_blocks, held_block_count
from vllm_kvevict.vllm.metrics import EvictionMetricsMixin, pool_geometry, requested_labels
from vllm_kvevict.vllm.worker import get_worker_state

logger = logging.getLogger(__name__)

CONNECTOR_NAME = "KVEvictConnector"
CONNECTOR_MODULE = __name__


@dataclass
class KVEvictConnectorMetadata(KVConnectorMetadata):
    #: requests whose blocks changed under them (finished, preempted, resumed).
    reset_req_ids: set[str] = field(default_factory=set)
    #: request id -> admission count, for requests (re)admitted this step (see generations).
    generations: dict[str, int] = field(default_factory=dict)
    #: head granularity: request id -> its ``K`` compact block ids, for requests whose prompt
    #: completes this step (scored, then compacted after the forward).
    compact_orders: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class KVEvictWorkerMetadata(KVConnectorWorkerMetadata):
    """``evicted[req_id]``: positional block indices; ``generations[req_id]``: the admission
    they belong to (a report about an earlier admission of a preempted request is dropped)."""

    evicted: dict[str, list[int]] = field(default_factory=dict)
    generations: dict[str, int] = field(default_factory=dict)
    #: request id -> (policy, seconds of its eviction pass), for the metrics.
    passes: dict[str, tuple[str, float]] = field(default_factory=dict)
    #: head granularity: compacted (kept tokens per (layer, KV head)) and failed (left whole,
    #: their compact blocks go back).
    head_compacted: dict[str, list[int]] = field(default_factory=dict)
    head_failed: set[str] = field(default_factory=set)

    def is_empty(self) -> bool:
        return not (self.evicted or self.head_compacted or self.head_failed)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        merged, gens = dict(self.evicted), dict(self.generations)
        for req_id, blocks in getattr(other, "evicted", {}).items():
            if req_id in merged and merged[req_id] != blocks:
                logger.warning("kvevict: ranks disagree on evicted pages of %s; keeping none", req_id)
                merged[req_id] = []
            else:
                merged.setdefault(req_id, blocks)
                gens.setdefault(req_id, getattr(other, "generations", {}).get(req_id, 0))
        passes = dict(getattr(other, "passes", {}))
        passes.update(self.passes)
        # tensor parallelism is not supported yet: head reports are taken from rank 0 (self)
        return KVEvictWorkerMetadata(
            evicted=merged,
            generations=gens,
            passes=passes,
            head_compacted=dict(self.head_compacted),
            head_failed=set(self.head_failed) | set(getattr(other, "head_failed", ())),
        )


class KVEvictConnector(EvictionMetricsMixin, KVConnectorBase_V1):
    """Carries eviction decisions; its stats are the ``kvevict_*`` metrics (see metrics.py).

    Metrics: what reaches vLLM's pool is recorded on the scheduler side (one record per request
    eviction, however many workers), when the report is applied; scoring time, ``skipped_short``
    and errors on the worker side (see "metrics" at the end of the class)."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        try:
            default = EvictionConfig.from_additional_config(vllm_config.additional_config)
        except Exception as exc:
            logger.error("kvevict: invalid server eviction config, eviction off: %s", exc)
            default = EvictionConfig()
        self._pending_evicted: dict[str, list[int]] = {}
        self._pending_generations: dict[str, int] = {}
        self._pending_passes: dict[str, tuple[str, float]] = {}
        self._pending_head = KVEvictWorkerMetadata()
        model_config = vllm_config.model_config
        self._num_layers = model_config.get_num_layers(vllm_config.parallel_config)
        self._num_kv_heads = model_config.get_num_kv_heads(vllm_config.parallel_config)
        #: scheduler side: request id -> how many times it was admitted (new or resumed).
        self._generation: dict[str, int] = {}
        self.scheduler_state: Optional[SchedulerEvictionState] = None
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler_state = SchedulerEvictionState(default)
            pool = pool_geometry(kv_cache_config)  # metrics: pool size, bytes per block
            if pool is not None:
                self.eviction_stats.set_pool(*pool)
        else:
            state = get_worker_state()
            state.server_default = default
            state.enabled = True

    # ------------------------------------------------------------------ worker side
    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        # Every step. V1 runner: before the batch is updated; MRV2: after planning (see worker).
        get_worker_state().begin_step(
            getattr(kv_connector_metadata, "reset_req_ids", ()),
            getattr(kv_connector_metadata, "generations", None),
            getattr(kv_connector_metadata, "compact_orders", None),
        )

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        return

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return

    def wait_for_save(self):
        # After the forward: choose this step's evicted pages.
        state = get_worker_state()
        scoring = self._worker_metrics_before(state)
        try:
            evicted = state.finish_step()
        except Exception as exc:  # never into the engine core
            logger.warning("kvevict: page selection failed: %s", exc)
            evicted = {}
        self._pending_evicted.update(evicted)
        for req_id in evicted:
            self._pending_generations[req_id] = state.generation_of(req_id)
        self._pending_passes.update(state.last_evictions)
        self._record_worker_metrics(state, evicted, scoring)
        head = self._pending_head
        head.head_compacted.update(state.head_compacted)
        head.head_failed |= state.head_failed
        for req_id in (*state.head_compacted, *state.head_failed):
            self._pending_generations[req_id] = state.generation_of(req_id)

    def build_connector_worker_meta(self) -> Optional[KVConnectorWorkerMetadata]:
        head = self._pending_head
        if not self._pending_evicted and head.is_empty():
            return None
        meta = KVEvictWorkerMetadata(
            evicted=self._pending_evicted,
            generations=self._pending_generations,
            passes=self._pending_passes,
            head_compacted=head.head_compacted,
            head_failed=head.head_failed,
        )
        self._pending_evicted, self._pending_generations, self._pending_passes = {}, {}, {}
        self._pending_head = KVEvictWorkerMetadata()
        return meta

    # ------------------------------------------------------------------ scheduler side
    def bind_kv_cache_manager(self, kv_cache_manager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        if self.scheduler_state is not None:
            attach_state(kv_cache_manager, self.scheduler_state)

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        self._note_admission(request)

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        finished = set(scheduler_output.finished_req_ids or ())
        admitted = {r.req_id for r in scheduler_output.scheduled_new_reqs}
        admitted |= set(scheduler_output.scheduled_cached_reqs.resumed_req_ids or ())
        reset = finished | admitted | set(scheduler_output.preempted_req_ids or ())
        for req_id in finished:
            self._generation.pop(req_id, None)
        for req_id in finished | set(scheduler_output.preempted_req_ids or ()):
            self.release_tokens(req_id)  # metrics: no longer held
        for req_id in admitted:
            self._generation[req_id] = self._generation.get(req_id, 0) + 1
        state = self.scheduler_state
        orders = {}
        if state is not None:
            state.forget(reset)
            for req_id in reset:
                self._release_pending(req_id)
            orders = self._order_compactions(scheduler_output)
        return KVEvictConnectorMetadata(
            reset_req_ids=reset,
            generations={r: self._generation[r] for r in admitted},
            compact_orders=orders,
        )

    def update_connector_output(self, connector_output) -> None:
        meta = connector_output.kv_connector_worker_meta
        state = self.scheduler_state
        if meta is None or state is None or self._kv_cache_manager is None:
            return
        self._apply_head_reports(meta)
        evicted = getattr(meta, "evicted", None)
        if not evicted:
            return
        generations = getattr(meta, "generations", {})
        for req_id, blocks in evicted.items():
            # With async scheduling a request can be preempted (blocks freed) and re-admitted
            # before the output that evicted its pages is processed: that report is stale.
            if not blocks or generations.get(req_id) != self._generation.get(req_id):
                continue
            try:
                n = evict_blocks(self._kv_cache_manager, req_id, blocks)
            except Exception as exc:
                logger.error("kvevict: could not free evicted blocks of %s: %s", req_id, exc)
                continue
            if n:
                state.frozen.add(req_id)
            state.blocks_returned += n
            policy, seconds = getattr(meta, "passes", {}).get(req_id, ("other", 0.0))
            block_size = self._block_size()
            self.eviction_stats.record(policy, "page", len(blocks) * block_size, len(blocks), seconds)
            self._record_page_eviction(req_id, policy, blocks, n)

    # ------------------------------------------------------------------ head granularity
    def _order_compactions(self, scheduler_output) -> dict[str, list[int]]:
        """``K`` compact blocks for every head-granular request whose prompt completes in this
        step (it is scored, then compacted after the forward); see :mod:`.head_blocks`."""
        from vllm_kvevict.vllm.head_blocks import PendingCompaction, blocks_released_by_compaction, take_compact_blocks

        state, manager = self.scheduler_state, self._kv_cache_manager
        admitted = self._admitted_requests()
        if manager is None or not admitted:
            return {}
        computed = {r.req_id: r.num_computed_tokens for r in scheduler_output.scheduled_new_reqs}
        cached = scheduler_output.scheduled_cached_reqs
        computed.update(zip(cached.req_ids, cached.num_computed_tokens))
        orders = {}
        for req_id, num_scheduled in scheduler_output.num_scheduled_tokens.items():
            request, done = admitted.get(req_id), computed.get(req_id)
            if request is None or done is None:
                continue
            prompt_len = request.num_prompt_tokens
            if not done < prompt_len <= done + num_scheduled:
                continue
            cfg = state.known_config(req_id)
            if cfg is None or cfg.resolved_granularity != "head" or req_id in state.pending_compactions:
                continue
            k, released = blocks_released_by_compaction(
                cfg, prompt_len, self._block_size(), self._num_layers, self._num_kv_heads
            )
            blocks = take_compact_blocks(manager, req_id, k) if k < released else None
            if blocks is None:
                continue  # left whole: nothing to gain, or no room in the pool
            state.pending_compactions[req_id] = PendingCompaction(blocks, released, self._generation.get(req_id, 0))
            state.frozen.add(req_id)  # tokens from here on attend a compacted context
            orders[req_id] = [b.block_id for b in blocks]
        return orders

    def _apply_head_reports(self, meta: KVConnectorWorkerMetadata) -> None:
        """Compacted requests swap their compact blocks in and free their positional blocks;
        failed ones give the compact blocks back. See :mod:`vllm_kvevict.vllm.head_blocks`."""
        from vllm_kvevict.vllm.head_blocks import install_compact_blocks

        state, manager = self.scheduler_state, self._kv_cache_manager
        generations = getattr(meta, "generations", {})
        for req_id in getattr(meta, "head_failed", ()):
            self._release_pending(req_id)
        for req_id, kept_per_head in getattr(meta, "head_compacted", {}).items():
            pending = state.pending_compactions.get(req_id)
            if pending is None or generations.get(req_id) != self._generation.get(req_id):
                continue
            del state.pending_compactions[req_id]
            released = install_compact_blocks(manager, req_id, pending)
            if released is None:
                self._free_blocks(pending.blocks)
                continue
            returned = released - len(pending.blocks)
            state.blocks_returned += returned
            cfg = state.known_config(req_id)
            policy = cfg.scorer if cfg is not None else "other"
            seconds = getattr(meta, "passes", {}).get(req_id, ("", 0.0))[1]
            # token-equivalents: prompt tokens minus the mean kept per (layer, KV head)
            request = self._admitted_requests().get(req_id)
            prompt_len = request.num_prompt_tokens if request is not None else 0
            kept_tokens = sum(kept_per_head) / max(1, len(kept_per_head))
            evicted_tokens = max(0, round(prompt_len - kept_tokens))
            self.eviction_stats.record(policy, "head", evicted_tokens, max(0, returned), seconds)
            self.eviction_stats.record_blocks_returned(returned)
            self._record_head_memory(request, cfg, policy, kept_per_head, evicted_tokens, kept_tokens)

    def _record_head_memory(self, request, cfg, policy, kept_per_head, evicted_tokens: int, kept_tokens: float) -> None:
        """Memory efficiency (ideal / held, from vLLM's block list), compression, per-head spread
        and held tokens of a request that was just compacted."""
        from vllm_kvevict.cache import ideal_blocks

        self.eviction_stats.record_head_budgets(policy, "head", kept_per_head)
        if request is None or cfg is None:
            return
        prompt_len = request.num_prompt_tokens
        held = held_block_count(self._kv_cache_manager, request.request_id)
        ideal = ideal_blocks(cfg, prompt_len, int(request.num_tokens), self._block_size())
        self.eviction_stats.record_memory(policy, "head", ideal, held, prompt_len, round(kept_tokens))
        self.hold_tokens(request, policy, "head", evicted_tokens)

    def _release_pending(self, req_id: str) -> None:
        state = self.scheduler_state
        if state is None:
            return
        pending = state.pending_compactions.pop(req_id, None)
        if pending is not None:
            self._free_blocks(pending.blocks)

    def _free_blocks(self, blocks: list) -> None:
        from vllm_kvevict.vllm.head_blocks import release_blocks

        if self._kv_cache_manager is not None:
            release_blocks(self._kv_cache_manager, blocks)

    def _block_size(self) -> int:
        managers = self._kv_cache_manager.coordinator.single_type_managers
        return managers[0].block_size if managers else 0

    def request_finished(self, request, block_ids):
        self._generation.pop(request.request_id, None)
        self._release_pending(request.request_id)
        state = self.scheduler_state
        if state is not None:
            state.finished(request.request_id)
        self.release_tokens(request.request_id)
        return False, None

    # ------------------------------------------------------------------ metrics (metrics.py)
    def _note_admission(self, request) -> None:
        """Scheduler side, every allocation of a waiting request: on its first admission count
        it as ``opted_out`` when its policy leaves it whole; remember it for the held gauges."""
        state = self.scheduler_state
        if state is None:
            return
        self._admitted_requests()[request.request_id] = request
        if request.request_id in self._generation:
            return  # resumed after preemption: counted already
        try:
            if state.config_for(request) is None:
                sp = getattr(request, "sampling_params", None)
                labels = requested_labels(getattr(sp, "extra_args", None), state.server_default)
                self.eviction_stats.record_outcome(*labels, "opted_out")
        except Exception as exc:  # metrics never break scheduling
            logger.debug("kvevict: admission not counted: %s", exc)

    def _admitted_requests(self) -> dict:
        """Scheduler side: request id -> scheduler ``Request`` of every admitted, unfinished
        request (for its prompt length, the metrics and the held-token gauges)."""
        return self.__dict__.setdefault("_kvevict_requests", {})

    def release_tokens(self, req_id: str) -> None:
        super().release_tokens(req_id)
        self._admitted_requests().pop(req_id, None)

    def _record_page_eviction(self, req_id: str, policy: str, blocks: list[int], returned: int) -> None:
        """Scheduler side, after a page eviction was applied: blocks and bytes returned,
        compression, per-head budgets (all heads keep the same pages), held tokens."""
        import math

        self.eviction_stats.record_blocks_returned(returned)
        request = self._admitted_requests().get(req_id)
        if request is None:
            return
        block_size = self._block_size()
        logical = int(request.num_prompt_tokens)
        evicted = len(blocks) * block_size
        kept = max(0, logical - evicted)
        held = held_block_count(self._kv_cache_manager, req_id)
        self.eviction_stats.record_memory(policy, "page", math.ceil(kept / block_size), held, logical, kept)
        heads = getattr(self, "_num_layers", 0) * getattr(self, "_num_kv_heads", 0)
        self.eviction_stats.record_head_budgets(policy, "page", [kept] * heads)
        self.hold_tokens(request, policy, "page", evicted)

    def _worker_metrics_before(self, state) -> dict[str, float]:
        """Worker side, before ``finish_step``: seconds the attention backend spent scoring the
        requests whose prompt completes this step."""
        return {
            plan.req_id: state.requests[plan.req_id].seconds
            for plan in state.rows.values()
            if plan.score and plan.req_id in state.requests
        }

    def _record_worker_metrics(self, state, evicted: dict, scoring: dict[str, float]) -> None:
        """Worker side, after ``finish_step``: scoring time, ``skipped_short`` (scored, nothing
        worth evicting) and ``error`` outcomes, each failed request once. Evicted outcomes are
        counted by the scheduler side, once the report is applied. (With tensor parallelism
        every rank would count these: not supported yet.)"""
        labels_of = lambda r: (r.config.scorer, str(getattr(r.config, "resolved_granularity", "page")))  # noqa: E731
        for req_id, seconds in scoring.items():
            request = state.requests.get(req_id)
            if request is None or request.failed:
                continue
            self.eviction_stats.record_scoring(*labels_of(request), seconds)
            if req_id in evicted and not evicted[req_id]:
                self.eviction_stats.record_outcome(*labels_of(request), "skipped_short")
        counted = self.__dict__.setdefault("_kvevict_failed", set())
        counted &= set(state.requests)
        for req_id, request in state.requests.items():
            if request.failed and req_id not in counted:
                counted.add(req_id)
                self.eviction_stats.record_outcome(*labels_of(request), "error")
                self.eviction_stats.record_error("scoring")
