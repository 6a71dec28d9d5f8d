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
from vllm_kvevict.vllm.manager import SchedulerEvictionState, attach_state, evict_blocks
from vllm_kvevict.vllm.metrics import EvictionMetricsMixin
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


@dataclass
class KVEvictWorkerMetadata(KVConnectorWorkerMetadata):
    """``evicted[req_id]``: positional block indices; ``generations[req_id]``: the admission
    they belong to (a report about an earlier admission of a preempted request is dropped)."""

    evicted: dict[str, list[int]] = field(default_factory=dict)
    generations: dict[str, int] = field(default_factory=dict)
    #: request id -> (policy, seconds of its eviction pass), for the metrics.
    passes: dict[str, tuple[str, float]] = field(default_factory=dict)

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
        return KVEvictWorkerMetadata(evicted=merged, generations=gens, passes=passes)


class KVEvictConnector(EvictionMetricsMixin, KVConnectorBase_V1):
    """Carries eviction decisions; its stats are the ``kvevict_*`` metrics (see metrics.py).

    Metrics are recorded on the scheduler side only (one record per request eviction, however
    many workers), when the report is applied."""

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
        #: scheduler side: request id -> how many times it was admitted (new or resumed).
        self._generation: dict[str, int] = {}
        self.scheduler_state: Optional[SchedulerEvictionState] = None
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler_state = SchedulerEvictionState(default)
        else:
            state = get_worker_state()
            state.server_default = default
            state.enabled = True

    # ------------------------------------------------------------------ worker side
    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        # Every step. V1 runner: before the batch is updated; MRV2: after planning (see worker).
        get_worker_state().begin_step(
            getattr(kv_connector_metadata, "reset_req_ids", ()), getattr(kv_connector_metadata, "generations", None)
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
        try:
            evicted = state.finish_step()
        except Exception as exc:  # never into the engine core
            logger.warning("kvevict: page selection failed: %s", exc)
            evicted = {}
        self._pending_evicted.update(evicted)
        for req_id in evicted:
            self._pending_generations[req_id] = state.generation_of(req_id)
        self._pending_passes.update(state.last_evictions)

    def build_connector_worker_meta(self) -> Optional[KVConnectorWorkerMetadata]:
        if not self._pending_evicted:
            return None
        meta = KVEvictWorkerMetadata(
            evicted=self._pending_evicted, generations=self._pending_generations, passes=self._pending_passes
        )
        self._pending_evicted, self._pending_generations, self._pending_passes = {}, {}, {}
        return meta

    # ------------------------------------------------------------------ scheduler side
    def bind_kv_cache_manager(self, kv_cache_manager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        if self.scheduler_state is not None:
            attach_state(kv_cache_manager, self.scheduler_state)

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        return

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        finished = set(scheduler_output.finished_req_ids or ())
        admitted = {r.req_id for r in scheduler_output.scheduled_new_reqs}
        admitted |= set(scheduler_output.scheduled_cached_reqs.resumed_req_ids or ())
        reset = finished | admitted | set(scheduler_output.preempted_req_ids or ())
        for req_id in finished:
            self._generation.pop(req_id, None)
        for req_id in admitted:
            self._generation[req_id] = self._generation.get(req_id, 0) + 1
        if self.scheduler_state is not None:
            self.scheduler_state.forget(reset)
        return KVEvictConnectorMetadata(
            reset_req_ids=reset, generations={r: self._generation[r] for r in admitted}
        )

    def update_connector_output(self, connector_output) -> None:
        meta = connector_output.kv_connector_worker_meta
        evicted = getattr(meta, "evicted", None)
        state = self.scheduler_state
        if not evicted or state is None or self._kv_cache_manager is None:
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
            self.eviction_stats.record_blocks_returned(n)

    def _block_size(self) -> int:
        managers = self._kv_cache_manager.coordinator.single_type_managers
        return managers[0].block_size if managers else 0

    def request_finished(self, request, block_ids):
        self._generation.pop(request.request_id, None)
        state = self.scheduler_state
        if state is not None:
            state.finished(request.request_id)
        return False, None
