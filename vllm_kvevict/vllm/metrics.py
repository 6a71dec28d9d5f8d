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
from closed sets; never a request id). docs/OBSERVABILITY.md has the PromQL that reads them.

================================================  =========  ===================================
``kvevict_requests_total``                        counter    requests by ``outcome``: evicted,
                                                             skipped_short, opted_out, rejected,
                                                             error
``kvevict_requests_evicted_total``                counter    eviction passes (one per request
                                                             unless ``--kv-decode-interval``)
``kvevict_tokens_evicted_total``                  counter    token positions whose KV was dropped
``kvevict_blocks_evicted_total``                  counter    KV blocks dropped from block lists
``kvevict_eviction_seconds``                      histogram  time of one eviction pass (scoring
                                                             and selection)
``kvevict_scoring_seconds``                       histogram  scoring part of a pass (attention
                                                             backend, all layers)
``kvevict_compression_ratio``                     histogram  kept / logical tokens per request
``kvevict_memory_efficiency``                     histogram  ideal / held blocks per request
``kvevict_head_kept_tokens``                      histogram  kept tokens per (layer, KV head)
``kvevict_last_head_kept_tokens``                 gauge      ``stat`` = min, mean, max over the
                                                             heads of the latest eviction
``kvevict_logical_tokens``                        gauge      tokens of running evicted requests
                                                             as stock vLLM would hold them
``kvevict_held_tokens``                           gauge      the same requests' tokens held now
``kvevict_blocks_returned_total``                 counter    blocks handed back to vLLM's pool
``kvevict_bytes_returned_total``                  counter    the same, in bytes of KV cache
``kvevict_cache_blocks``                          gauge      blocks in vLLM's pool
``kvevict_block_size_tokens``                     gauge      tokens per block
``kvevict_block_bytes``                           gauge      KV-cache bytes per block (all
                                                             layers)
``kvevict_errors_total``                          counter    failures by ``stage`` (scoring,
                                                             free); the request is left whole
================================================  =========  ===================================

The last six carry only ``model_name`` and ``engine`` (``errors``: plus ``stage``).

Use from the eviction core (engine-core side), through the connector::

    class KVEvictConnector(EvictionMetricsMixin, KVConnectorBase_V1):
        ...
    # scheduler side, once per request eviction (record on ONE side only: with tensor
    # parallelism every worker would count the same eviction):
    self.eviction_stats.record("snapkv", "page", tokens=1800, blocks=112, seconds=0.004)
    self.eviction_stats.record_blocks_returned(112, num_bytes=112 * block_bytes)
    self.eviction_stats.record_memory("snapkv", "page", ideal_blocks=14, held_blocks=14,
                                      logical_tokens=2000, kept_tokens=200)
    self.eviction_stats.record_head_budgets("snapkv", "head", kept_per_head=[...])
    self.hold_tokens(request, "snapkv", "page", evicted_tokens=1800)   # gauges, until
    self.release_tokens(request.request_id)                             # it finishes

The mixin provides ``get_kv_connector_stats``, ``build_kv_connector_stats`` and
``build_prom_metrics``; without it, call :meth:`EvictionStatsRecorder.take`,
:func:`build_kv_connector_stats` and :func:`build_prom_metrics` from those three methods.
The ``rejected`` outcome happens in the API server (HTTP 400), the process that serves
``/metrics``: :func:`record_rejected` counts it there directly.
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
#: Scoring durations, seconds (all layers of one request; CPU scoring of long prompts is slow).
SCORING_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Ratios in [0, 1] (compression: kept / logical; efficiency: ideal / held).
RATIO_BUCKETS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
#: Kept tokens of one (layer, KV head).
HEAD_TOKENS_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
#: Label value for a policy or granularity outside the known sets (keeps label sets bounded).
OTHER = "other"
#: ``outcome`` label values of ``kvevict_requests_total``.
OUTCOMES = ("evicted", "skipped_short", "opted_out", "rejected", "error")
#: ``stage`` label values of ``kvevict_errors_total``.
ERROR_STAGES = ("scoring", "free")
HEAD_STATS = ("min", "mean", "max")

_EVICTIONS = "evictions"  # [[policy, granularity, tokens, blocks, seconds], ...]
_BLOCKS_RETURNED = "blocks_returned"  # [n, ...]
_BYTES_RETURNED = "bytes_returned"  # [n, ...]
_OUTCOMES = "outcomes"  # [[policy, granularity, outcome], ...]
_SCORING = "scoring"  # [[policy, granularity, seconds], ...]
_MEMORY = "memory"  # [[policy, granularity, ideal_blocks, held_blocks, logical, kept], ...]
_HEADS = "head_budgets"  # [[policy, granularity, [kept per (layer, head)]], ...]
_ERRORS = "errors"  # [stage, ...]
_HELD = "held"  # latest snapshot: [[policy, granularity, logical, kept], ...]
_POOL = "pool"  # latest snapshot: [num_blocks, block_size, bytes_per_block]
_LISTS = (_EVICTIONS, _BLOCKS_RETURNED, _BYTES_RETURNED, _OUTCOMES, _SCORING, _MEMORY, _HEADS, _ERRORS)
_SNAPSHOTS = (_HELD, _POOL)


def bounded_labels(policy: str, granularity: str) -> tuple[str, str]:
    """``(policy, granularity)``, each replaced by ``other`` outside its closed set."""
    return (policy if policy in SCORERS else OTHER, granularity if granularity in GRANULARITIES else OTHER)


@dataclass
class EvictionStats(KVConnectorStats):
    """Eviction observations of one interval; ``data`` is plain lists (msgpack-serialisable)."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = {key: [] for key in _LISTS}

    def record(self, policy: str, granularity: str, tokens: int, blocks: int, seconds: float) -> None:
        """One eviction pass of one request (also counts the ``evicted`` outcome)."""
        policy, granularity = bounded_labels(policy, granularity)
        self.data[_EVICTIONS].append([policy, granularity, int(tokens), int(blocks), float(seconds)])
        self.record_outcome(policy, granularity, "evicted")

    def record_outcome(self, policy: str, granularity: str, outcome: str) -> None:
        """One request's fate: one of :data:`OUTCOMES`."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        self.data.setdefault(_OUTCOMES, []).append([*bounded_labels(policy, granularity), outcome])

    def record_scoring(self, policy: str, granularity: str, seconds: float) -> None:
        """Time spent scoring one request (all layers)."""
        self.data.setdefault(_SCORING, []).append([*bounded_labels(policy, granularity), float(seconds)])

    def record_blocks_returned(self, num_blocks: int, num_bytes: int = 0) -> None:
        """Blocks handed back to vLLM's free pool (and their KV-cache bytes)."""
        if num_blocks:
            self.data[_BLOCKS_RETURNED].append(int(num_blocks))
        if num_bytes:
            self.data.setdefault(_BYTES_RETURNED, []).append(int(num_bytes))

    def record_memory(
        self, policy: str, granularity: str, ideal_blocks: int, held_blocks: int, logical_tokens: int, kept_tokens: int
    ) -> None:
        """One request after eviction: blocks held against the ideal, tokens kept of the logical."""
        self.data.setdefault(_MEMORY, []).append(
            [*bounded_labels(policy, granularity), int(ideal_blocks), int(held_blocks), int(logical_tokens), int(kept_tokens)]
        )

    def record_head_budgets(self, policy: str, granularity: str, kept_per_head: list[int]) -> None:
        """Kept tokens of every (layer, KV head) of one eviction."""
        if len(kept_per_head):
            self.data.setdefault(_HEADS, []).append([*bounded_labels(policy, granularity), [int(k) for k in kept_per_head]])

    def record_error(self, stage: str) -> None:
        """A failure that left a request whole; ``stage`` is one of :data:`ERROR_STAGES`."""
        self.data.setdefault(_ERRORS, []).append(stage if stage in ERROR_STAGES else OTHER)

    def set_held(self, totals: dict[tuple[str, str], tuple[int, int]]) -> None:
        """Current ``(policy, granularity) -> (logical, kept)`` tokens of running evicted requests."""
        self.data[_HELD] = [[p, g, int(logical), int(kept)] for (p, g), (logical, kept) in sorted(totals.items())]

    def set_pool(self, num_blocks: int, block_size: int, bytes_per_block: int) -> None:
        self.data[_POOL] = [int(num_blocks), int(block_size), int(bytes_per_block)]

    def aggregate(self, other: KVConnectorStats) -> "EvictionStats":
        if not other.is_empty():
            for key in _LISTS:
                self.data.setdefault(key, []).extend(other.data.get(key, []))
            for key in _SNAPSHOTS:  # the later snapshot wins
                if key in other.data:
                    self.data[key] = other.data[key]
        return self

    def reduce(self) -> dict[str, int | float]:
        evictions = self.data.get(_EVICTIONS, [])
        return {
            "kvevict requests evicted": len(evictions),
            "kvevict tokens evicted": sum(e[2] for e in evictions),
            "kvevict blocks evicted": sum(e[3] for e in evictions),
            "kvevict blocks returned": sum(self.data.get(_BLOCKS_RETURNED, [])),
            "kvevict eviction seconds": round(sum(e[4] for e in evictions), 6),
            "kvevict errors": len(self.data.get(_ERRORS, [])),
        }

    def is_empty(self) -> bool:
        return not any(self.data.get(key) for key in _LISTS) and not any(key in self.data for key in _SNAPSHOTS)


class EvictionStatsRecorder:
    """Thread-safe accumulator owned by one connector instance; :meth:`take` drains it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = EvictionStats()
        self._last_held: Optional[list] = None
        self._block_bytes = 0

    def record(self, policy: str, granularity: str, tokens: int, blocks: int, seconds: float) -> None:
        with self._lock:
            self._stats.record(policy, granularity, tokens, blocks, seconds)

    def record_outcome(self, policy: str, granularity: str, outcome: str) -> None:
        with self._lock:
            self._stats.record_outcome(policy, granularity, outcome)

    def record_scoring(self, policy: str, granularity: str, seconds: float) -> None:
        with self._lock:
            self._stats.record_scoring(policy, granularity, seconds)

    def record_blocks_returned(self, num_blocks: int, num_bytes: Optional[int] = None) -> None:
        """``num_bytes`` defaults to ``num_blocks`` times the block bytes of :meth:`set_pool`."""
        if num_bytes is None:
            num_bytes = num_blocks * self._block_bytes
        with self._lock:
            self._stats.record_blocks_returned(num_blocks, num_bytes)

    def record_memory(
        self, policy: str, granularity: str, ideal_blocks: int, held_blocks: int, logical_tokens: int, kept_tokens: int
    ) -> None:
        with self._lock:
            self._stats.record_memory(policy, granularity, ideal_blocks, held_blocks, logical_tokens, kept_tokens)

    def record_head_budgets(self, policy: str, granularity: str, kept_per_head: list[int]) -> None:
        with self._lock:
            self._stats.record_head_budgets(policy, granularity, kept_per_head)

    def record_error(self, stage: str) -> None:
        with self._lock:
            self._stats.record_error(stage)

    def set_held(self, totals: dict[tuple[str, str], tuple[int, int]]) -> None:
        """Send the held-token totals with the next :meth:`take`, if they changed."""
        with self._lock:
            probe = EvictionStats()
            probe.set_held(totals)
            if probe.data[_HELD] != self._last_held:
                self._stats.data[_HELD] = self._last_held = probe.data[_HELD]

    def set_pool(self, num_blocks: int, block_size: int, bytes_per_block: int) -> None:
        self._block_bytes = int(bytes_per_block)
        with self._lock:
            self._stats.set_pool(num_blocks, block_size, bytes_per_block)

    def take(self) -> Optional[EvictionStats]:
        """The stats since the last call, or None if nothing happened."""
        with self._lock:
            if self._stats.is_empty():
                return None
            stats, self._stats = self._stats, EvictionStats()
            return stats


#: The front-end's metrics (the API server process), for :func:`record_rejected`.
_ACTIVE: Optional["EvictionPromMetrics"] = None


class EvictionPromMetrics(KVConnectorPromMetrics):
    """The ``kvevict_*`` series; vLLM's Prometheus logger creates it once per front-end."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ):
        global _ACTIVE
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        policy_labels = [*labelnames, "policy", "granularity"]
        self.requests = self._counter(
            "requests", "Requests by eviction outcome (evicted, skipped_short, opted_out, rejected, error).",
            [*policy_labels, "outcome"],
        )  # fmt: skip
        self.requests_evicted = self._counter(
            "requests_evicted", "Eviction passes (one per request unless re-compressed).", policy_labels
        )
        self.tokens_evicted = self._counter(
            "tokens_evicted", "Token positions whose KV was dropped by eviction.", policy_labels
        )
        self.blocks_evicted = self._counter(
            "blocks_evicted", "KV-cache blocks dropped from requests' block lists.", policy_labels
        )
        self.eviction_seconds = self._histogram(
            "eviction_seconds", "Time of one eviction pass, seconds.", policy_labels, EVICTION_SECONDS_BUCKETS
        )
        self.scoring_seconds = self._histogram(
            "scoring_seconds", "Time spent scoring one request (all layers), seconds.", policy_labels,
            SCORING_SECONDS_BUCKETS,
        )  # fmt: skip
        self.compression_ratio = self._histogram(
            "compression_ratio", "Kept / logical tokens of one request after eviction.", policy_labels, RATIO_BUCKETS
        )
        self.memory_efficiency = self._histogram(
            "memory_efficiency", "Ideal / held KV blocks of one request after eviction.", policy_labels, RATIO_BUCKETS
        )
        self.head_kept_tokens = self._histogram(
            "head_kept_tokens", "Kept tokens of one (layer, KV head) after eviction.", policy_labels,
            HEAD_TOKENS_BUCKETS,
        )  # fmt: skip
        self.last_head_kept = self._gauge(
            "last_head_kept_tokens", "Kept tokens per (layer, KV head) of the latest eviction: min, mean, max.",
            [*policy_labels, "stat"],
        )  # fmt: skip
        self.logical_tokens = self._gauge(
            "logical_tokens", "Tokens of running evicted requests, as stock vLLM would hold them.", policy_labels
        )
        self.held_tokens = self._gauge("held_tokens", "Tokens those requests hold after eviction.", policy_labels)
        self.errors = self._counter("errors", "Eviction failures (request left whole), by stage.", [*labelnames, "stage"])
        self.blocks_returned = self._per_engine(
            self._counter("blocks_returned", "KV-cache blocks returned to vLLM's free block pool.", labelnames)
        )
        self.bytes_returned = self._per_engine(
            self._counter("bytes_returned", "KV-cache bytes returned to vLLM's free block pool.", labelnames)
        )
        self.cache_blocks = self._per_engine(self._gauge("cache_blocks", "KV-cache blocks in vLLM's pool.", labelnames))
        self.block_size = self._per_engine(self._gauge("block_size_tokens", "Tokens per KV-cache block.", labelnames))
        self.block_bytes = self._per_engine(
            self._gauge("block_bytes", "KV-cache bytes per block (all layers).", labelnames)
        )
        for engine in per_engine_labelvalues.values():  # bounded: exported at 0 from the start
            for stage in ERROR_STAGES:
                self.errors.labels(*engine, stage)
        cache = getattr(vllm_config, "cache_config", None)  # the engine sends the same at its first step
        if getattr(cache, "num_gpu_blocks", None) and getattr(cache, "block_size", None):
            for idx in per_engine_labelvalues:
                self.cache_blocks[idx].set(cache.num_gpu_blocks)
                self.block_size[idx].set(cache.block_size)
        #: engine index -> (policy, granularity) label pairs of the held-token gauges set so far.
        self._held_labels: dict[int, set[tuple[str, str]]] = {}
        _ACTIVE = self

    def _counter(self, name: str, documentation: str, labelnames: list[str]):
        _unregister(PREFIX + name)
        return self._counter_cls(name=PREFIX + name, documentation=documentation, labelnames=labelnames)

    def _gauge(self, name: str, documentation: str, labelnames: list[str]):
        _unregister(PREFIX + name)
        return self._gauge_cls(
            name=PREFIX + name, documentation=documentation, labelnames=labelnames, multiprocess_mode="mostrecent"
        )

    def _histogram(self, name: str, documentation: str, labelnames: list[str], buckets):
        _unregister(PREFIX + name)
        return self._histogram_cls(name=PREFIX + name, documentation=documentation, buckets=buckets, labelnames=labelnames)

    def _per_engine(self, metric):
        return create_metric_per_engine(metric, self.per_engine_labelvalues)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        engine = self.per_engine_labelvalues[engine_idx]
        data = transfer_stats_data
        for policy, granularity, tokens, blocks, seconds in data.get(_EVICTIONS, []):
            labels = (*engine, policy, granularity)
            self.requests_evicted.labels(*labels).inc()
            self.tokens_evicted.labels(*labels).inc(tokens)
            self.blocks_evicted.labels(*labels).inc(blocks)
            self.eviction_seconds.labels(*labels).observe(seconds)
        for policy, granularity, outcome in data.get(_OUTCOMES, []):
            self.requests.labels(*engine, policy, granularity, outcome).inc()
        for policy, granularity, seconds in data.get(_SCORING, []):
            self.scoring_seconds.labels(*engine, policy, granularity).observe(seconds)
        for policy, granularity, ideal, held, logical, kept in data.get(_MEMORY, []):
            if logical > 0:
                self.compression_ratio.labels(*engine, policy, granularity).observe(kept / logical)
            if held > 0:
                self.memory_efficiency.labels(*engine, policy, granularity).observe(ideal / held)
        for policy, granularity, kept in data.get(_HEADS, []):
            histogram = self.head_kept_tokens.labels(*engine, policy, granularity)
            for k in kept:
                histogram.observe(k)
            for stat, value in zip(HEAD_STATS, (min(kept), sum(kept) / len(kept), max(kept))):
                self.last_head_kept.labels(*engine, policy, granularity, stat).set(value)
        for stage in data.get(_ERRORS, []):
            self.errors.labels(*engine, stage).inc()
        if _HELD in data:
            seen = self._held_labels.setdefault(engine_idx, set())
            now = set()
            for policy, granularity, logical, kept in data[_HELD]:
                self.logical_tokens.labels(*engine, policy, granularity).set(logical)
                self.held_tokens.labels(*engine, policy, granularity).set(kept)
                now.add((policy, granularity))
            for policy, granularity in seen - now:  # no running evicted request left there
                self.logical_tokens.labels(*engine, policy, granularity).set(0)
                self.held_tokens.labels(*engine, policy, granularity).set(0)
            seen |= now
        if _POOL in data:
            num_blocks, block_size, block_bytes = data[_POOL]
            self.cache_blocks[engine_idx].set(num_blocks)
            self.block_size[engine_idx].set(block_size)
            self.block_bytes[engine_idx].set(block_bytes)
        returned = sum(data.get(_BLOCKS_RETURNED, []))
        if returned:
            self.blocks_returned[engine_idx].inc(returned)
        returned_bytes = sum(data.get(_BYTES_RETURNED, []))
        if returned_bytes:
            self.bytes_returned[engine_idx].inc(returned_bytes)

    def record_rejected(self, policy: str, granularity: str) -> None:
        """An HTTP 400 on a request's eviction settings (counted under engine 0: it reached none)."""
        engine = self.per_engine_labelvalues[min(self.per_engine_labelvalues)]
        self.requests.labels(*engine, *bounded_labels(policy, granularity), "rejected").inc()


def record_rejected(policy: str, granularity: str) -> None:
    """Count a request refused by the API server; a no-op where no eviction metrics exist
    (a ``--kv-eviction=none`` server, or an offline ``LLM`` without stats)."""
    if _ACTIVE is not None:
        _ACTIVE.record_rejected(policy, granularity)


def pool_geometry(kv_cache_config: Any) -> Optional[tuple[int, int, int]]:
    """``(blocks, tokens per block, bytes per block)`` of vLLM's KV-cache pool, or ``None``.

    Bytes per block: every KV-cache tensor's size over the number of blocks, i.e. what one
    block id holds across all layers (one block id indexes the same page of every layer).
    """
    try:
        num_blocks = int(kv_cache_config.num_blocks)
        block_size = int(kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size)
        total = sum(int(t.size) for t in kv_cache_config.kv_cache_tensors)
    except (AttributeError, IndexError, TypeError):
        return None
    return (num_blocks, block_size, total // num_blocks) if num_blocks > 0 else None


def requested_labels(extra_args: Any, server_default: Any) -> tuple[str, str]:
    """``(policy, granularity)`` a request asked for (its ``kv_*`` keys over the server's
    default), bounded; ``other`` for settings that do not validate."""
    from vllm_kvevict.config import EvictionConfig

    try:
        cfg = EvictionConfig.from_flat(dict(extra_args or {}), base=server_default)
    except Exception:
        flat = dict(extra_args or {})
        return bounded_labels(str(flat.get("kv_eviction", OTHER)), str(flat.get("kv_granularity", OTHER)))
    return bounded_labels(cfg.scorer, str(getattr(cfg, "resolved_granularity", cfg.granularity)))


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

    def hold_tokens(self, request: Any, policy: str, granularity: str, evicted_tokens: int) -> None:
        """Count a scheduler ``Request`` in the held-token gauges until :meth:`release_tokens`:
        logical = its ``num_computed_tokens``, held = logical - evicted (summed over passes)."""
        held = self.__dict__.setdefault("_kvevict_held", {})
        previous = held.get(request.request_id)
        evicted = int(evicted_tokens) + (previous[3] if previous else 0)
        held[request.request_id] = (request, *bounded_labels(policy, granularity), evicted)

    def release_tokens(self, req_id: str) -> None:
        self.__dict__.get("_kvevict_held", {}).pop(req_id, None)

    def held_token_totals(self) -> Optional[dict[tuple[str, str], tuple[int, int]]]:
        """``(policy, granularity) -> (logical, kept)`` over held requests (None: never used)."""
        held = self.__dict__.get("_kvevict_held")
        if held is None:
            return None
        totals: dict[tuple[str, str], tuple[int, int]] = {}
        for request, policy, granularity, evicted in held.values():
            logical = int(request.num_computed_tokens)
            lg, kp = totals.get((policy, granularity), (0, 0))
            totals[(policy, granularity)] = (lg + logical, kp + max(0, logical - evicted))
        return totals

    def get_kv_connector_stats(self) -> Optional[EvictionStats]:
        totals = self.held_token_totals()
        if totals is not None:
            self.eviction_stats.set_held(totals)
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
