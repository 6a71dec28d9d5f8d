"""Our KV connector: the channel between the scheduler and the workers (nothing is transferred).

It only carries: each half's work is done by :class:`~.scheduler.side.SchedulerSide` (admissions,
compaction orders, blocks leaving block lists) and :class:`~.worker.side.WorkerSide` (step plans,
evictions after the forward). Its stats are the ``kvevict_*`` metrics (:mod:`.metrics`).

Configured automatically when ``additional_config`` holds ``kv_eviction`` (:mod:`.startup`), or::

    --kv-transfer-config '{"kv_connector": "KVEvictConnector", "kv_role": "kv_both",
                           "kv_connector_module_path": "vllm_kvevict.vllm.connector"}'
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.vllm.channel import KVEvictConnectorMetadata, KVEvictWorkerMetadata
from vllm_kvevict.vllm.metrics import (
    EvictionStats,
    EvictionStatsRecorder,
    build_kv_connector_stats,
    build_prom_metrics,
    pool_geometry,
)
from vllm_kvevict.vllm.scheduler.side import SchedulerSide
from vllm_kvevict.vllm.worker.side import WorkerSide

logger = logging.getLogger(__name__)

CONNECTOR_NAME = "KVEvictConnector"
CONNECTOR_MODULE = __name__


class KVEvictConnector(KVConnectorBase_V1):
    """Carries eviction decisions (see the module docstring)."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        # Validated at startup (cli.normalize_additional_config); a bad one never gets here.
        default = EvictionConfig.from_additional_config(vllm_config.additional_config)
        self.stats = EvictionStatsRecorder()
        self.scheduler_side: Optional[SchedulerSide] = None
        #: the worker half, also the attention builders' step source (``step.step_source``).
        self.eviction_steps: Optional[WorkerSide] = None
        if role == KVConnectorRole.SCHEDULER:
            model_config, parallel = vllm_config.model_config, vllm_config.parallel_config
            self.scheduler_side = SchedulerSide(default, self.stats, model_config.get_num_layers(parallel),
                                                model_config.get_num_kv_heads(parallel))
            pool = pool_geometry(kv_cache_config)
            if pool is not None:
                self.stats.set_pool(*pool)
        else:
            self.eviction_steps = WorkerSide()

    # ------------------------------------------------------------------ worker side
    def register_kv_caches(self, kv_caches: dict) -> None:
        self.eviction_steps.register_kv_caches(kv_caches)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        # Model Runner V1 calls this first in every step, before the batch is updated.
        if isinstance(kv_connector_metadata, KVEvictConnectorMetadata):
            self.eviction_steps.receive(kv_connector_metadata)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        return

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return

    def wait_for_save(self):
        # After the forward: this step's evictions.
        done = self.eviction_steps.finish()
        for req_id, (scorer, granularity, seconds) in done.scored.items():
            if req_id not in done.failed:
                self.stats.record_scoring(scorer, granularity, seconds)
        for req_id in done.nothing_evicted:
            self.stats.record_outcome(*done.scored[req_id][:2], "skipped_short")
        for scorer, granularity, stage in done.failed.values():
            self.stats.record_outcome(scorer, granularity, "error")
            self.stats.record_error(stage)
        for _scorer, _granularity, stage in done.decode_failed.values():
            self.stats.record_error(stage)

    def build_connector_worker_meta(self) -> Optional[KVEvictWorkerMetadata]:
        return self.eviction_steps.take_report()

    # ------------------------------------------------------------------ scheduler side
    def bind_kv_cache_manager(self, kv_cache_manager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        self.scheduler_side.bind(kv_cache_manager)

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        self.scheduler_side.note_allocation(request)

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        return self.scheduler_side.build_metadata(scheduler_output)

    def update_connector_output(self, connector_output) -> None:
        report = connector_output.kv_connector_worker_meta
        self.scheduler_side.apply_report(report if isinstance(report, KVEvictWorkerMetadata) else None)

    def request_finished(self, request, block_ids):
        self.scheduler_side.request_finished(request.request_id)
        return False, None

    # ------------------------------------------------------------------ metrics
    def get_kv_connector_stats(self) -> Optional[EvictionStats]:
        if self.scheduler_side is not None and self.scheduler_side.held.used:
            self.stats.set_held(self.scheduler_side.held.totals())
        return self.stats.take()

    @classmethod
    def build_kv_connector_stats(cls, data: Optional[dict[str, Any]] = None) -> EvictionStats:
        return build_kv_connector_stats(data)

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return build_prom_metrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)
