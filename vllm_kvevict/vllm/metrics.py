"""``kvevict_*`` Prometheus metrics on vLLM's own ``/metrics``, carried by KV-connector stats.

Why this path: metrics made in the engine core are invisible to the API server's ``/metrics``
(without ``PROMETHEUS_MULTIPROC_DIR``), and vLLM's Prometheus logger unregisters ``vllm:``
collectors. vLLM 0.32 already ships a KV connector's stats from the engine core to the
front-end (``vllm/distributed/kv_transfer/kv_connector/v1/metrics.py``): the scheduler-side
connector's ``get_kv_connector_stats()`` (and the workers', via the model-runner output) are
aggregated into ``SchedulerStats.kv_connector_stats``; in the front-end the connector class's
``build_prom_metrics(...)`` object ``observe()``\\ s them, and ``build_kv_connector_stats(...)``
feeds the periodic log line. Nothing is exported unless the connector is configured, so
``--kv-eviction=none`` adds no series.

Series (labels ``model_name``, ``engine`` from vLLM, plus ``policy`` and ``granularity``, both
from closed sets; never a request id):

==========================================  =========  =====================================
``kvevict_requests_evicted_total``          counter    eviction passes (one per request
                                                       unless ``--kv-decode-interval``)
``kvevict_tokens_evicted_total``            counter    token positions whose KV was dropped
``kvevict_blocks_evicted_total``            counter    KV blocks dropped from block lists
``kvevict_eviction_seconds``                histogram  time of one eviction pass
``kvevict_blocks_returned_total``           counter    blocks handed back to vLLM's pool
                                                       (``model_name``, ``engine`` only)
==========================================  =========  =====================================

Use from the eviction core (engine-core side), through the connector::

    class KVEvictConnector(EvictionMetricsMixin, KVConnectorBase_V1):
        ...
    # scheduler side, once per request eviction (record on ONE side only: with tensor
    # parallelism every worker would count the same eviction):
    self.eviction_stats.record("snapkv", "page", tokens=1800, blocks=112, seconds=0.004)
    self.eviction_stats.record_blocks_returned(112)   # when the blocks reach the free pool

The mixin provides ``get_kv_connector_stats``, ``build_kv_connector_stats`` and
``build_prom_metrics``; without it, call :meth:`EvictionStatsRecorder.take`,
:func:`build_kv_connector_stats` and :func:`build_prom_metrics` from those three methods.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Optional

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)
from vllm.v1.metrics.utils import create_metric_per_engine

from vllm_kvevict.config import GRANULARITIES, SCORERS

PREFIX = "kvevict_"
#: Eviction-pass durations, seconds (a pass is scoring-free bookkeeping: well under a second).
EVICTION_SECONDS_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: Label value for a policy or granularity outside the known sets (keeps label sets bounded).
OTHER = "other"

_EVICTIONS = "evictions"  # [[policy, granularity, tokens, blocks, seconds], ...]
_BLOCKS_RETURNED = "blocks_returned"  # [n, ...]


@dataclass
class EvictionStats(KVConnectorStats):
    """Eviction observations of one interval; ``data`` is plain lists (msgpack-serialisable)."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = {_EVICTIONS: [], _BLOCKS_RETURNED: []}

    def record(self, policy: str, granularity: str, tokens: int, blocks: int, seconds: float) -> None:
        """One eviction pass of one request."""
        policy = policy if policy in SCORERS else OTHER
        granularity = granularity if granularity in GRANULARITIES else OTHER
        self.data[_EVICTIONS].append([policy, granularity, int(tokens), int(blocks), float(seconds)])

    def record_blocks_returned(self, num_blocks: int) -> None:
        """Blocks handed back to vLLM's free pool."""
        if num_blocks:
            self.data[_BLOCKS_RETURNED].append(int(num_blocks))

    def aggregate(self, other: KVConnectorStats) -> "EvictionStats":
        if not other.is_empty():
            for key in (_EVICTIONS, _BLOCKS_RETURNED):
                self.data.setdefault(key, []).extend(other.data.get(key, []))
        return self

    def reduce(self) -> dict[str, int | float]:
        evictions = self.data.get(_EVICTIONS, [])
        return {
            "kvevict requests evicted": len(evictions),
            "kvevict tokens evicted": sum(e[2] for e in evictions),
            "kvevict blocks evicted": sum(e[3] for e in evictions),
            "kvevict blocks returned": sum(self.data.get(_BLOCKS_RETURNED, [])),
            "kvevict eviction seconds": round(sum(e[4] for e in evictions), 6),
        }

    def is_empty(self) -> bool:
        return not self.data.get(_EVICTIONS) and not self.data.get(_BLOCKS_RETURNED)


class EvictionStatsRecorder:
    """Thread-safe accumulator owned by one connector instance; :meth:`take` drains it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = EvictionStats()

    def record(self, policy: str, granularity: str, tokens: int, blocks: int, seconds: float) -> None:
        with self._lock:
            self._stats.record(policy, granularity, tokens, blocks, seconds)

    def record_blocks_returned(self, num_blocks: int) -> None:
        with self._lock:
            self._stats.record_blocks_returned(num_blocks)

    def take(self) -> Optional[EvictionStats]:
        """The stats since the last call, or None if nothing happened."""
        with self._lock:
            if self._stats.is_empty():
                return None
            stats, self._stats = self._stats, EvictionStats()
            return stats


class EvictionPromMetrics(KVConnectorPromMetrics):
    """The ``kvevict_*`` series; vLLM's Prometheus logger creates it once per front-end."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        policy_labels = [*labelnames, "policy", "granularity"]
        self.requests_evicted = self._counter(
            "requests_evicted", "Eviction passes (one per request unless re-compressed).", policy_labels
        )
        self.tokens_evicted = self._counter(
            "tokens_evicted", "Token positions whose KV was dropped by eviction.", policy_labels
        )
        self.blocks_evicted = self._counter(
            "blocks_evicted", "KV-cache blocks dropped from requests' block lists.", policy_labels
        )
        _unregister(PREFIX + "eviction_seconds")
        self.eviction_seconds = self._histogram_cls(
            name=PREFIX + "eviction_seconds",
            documentation="Time of one eviction pass, seconds.",
            buckets=EVICTION_SECONDS_BUCKETS,
            labelnames=policy_labels,
        )
        blocks_returned = self._counter(
            "blocks_returned", "KV-cache blocks returned to vLLM's free block pool.", labelnames
        )
        self.blocks_returned = create_metric_per_engine(blocks_returned, per_engine_labelvalues)

    def _counter(self, name: str, documentation: str, labelnames: list[str]):
        _unregister(PREFIX + name)
        return self._counter_cls(name=PREFIX + name, documentation=documentation, labelnames=labelnames)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        engine_labels = self.per_engine_labelvalues[engine_idx]
        for policy, granularity, tokens, blocks, seconds in transfer_stats_data.get(_EVICTIONS, []):
            labels = (*engine_labels, policy, granularity)
            self.requests_evicted.labels(*labels).inc()
            self.tokens_evicted.labels(*labels).inc(tokens)
            self.blocks_evicted.labels(*labels).inc(blocks)
            self.eviction_seconds.labels(*labels).observe(seconds)
        returned = sum(transfer_stats_data.get(_BLOCKS_RETURNED, []))
        if returned:
            self.blocks_returned[engine_idx].inc(returned)


def build_kv_connector_stats(data: Optional[dict[str, Any]] = None) -> EvictionStats:
    """For the connector's ``build_kv_connector_stats`` classmethod."""
    return EvictionStats(data=data if data is not None else {})


def build_prom_metrics(
    vllm_config: Any,
    metric_types: dict[type[PromMetric], type[PromMetricT]],
    labelnames: list[str],
    per_engine_labelvalues: dict[int, list[object]],
) -> EvictionPromMetrics:
    """For the connector's ``build_prom_metrics`` classmethod."""
    return EvictionPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)


class EvictionMetricsMixin:
    """Mix into the KV connector class (before ``KVConnectorBase_V1``) to export the metrics."""

    @property
    def eviction_stats(self) -> EvictionStatsRecorder:
        recorder = self.__dict__.get("_kvevict_stats")
        if recorder is None:
            recorder = self.__dict__["_kvevict_stats"] = EvictionStatsRecorder()
        return recorder

    def get_kv_connector_stats(self) -> Optional[EvictionStats]:
        return self.eviction_stats.take()

    @classmethod
    def build_kv_connector_stats(cls, data: Optional[dict[str, Any]] = None) -> EvictionStats:
        return build_kv_connector_stats(data)

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return build_prom_metrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)


def _unregister(name: str) -> None:
    """Drop an earlier collector of ``name`` (vLLM only unregisters ``vllm:`` names itself)."""
    from prometheus_client import REGISTRY

    for collector, names in list(REGISTRY._collector_to_names.items()):
        if name in names or any(n.startswith(name + "_") for n in names):
            REGISTRY.unregister(collector)
