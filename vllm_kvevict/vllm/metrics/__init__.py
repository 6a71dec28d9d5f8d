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
                                                             error, decode_only
``kvevict_requests_evicted_total``                counter    eviction passes (one per request
                                                             unless ``--kv-decode-interval``)
``kvevict_tokens_evicted_total``                  counter    token positions whose KV was dropped
``kvevict_blocks_evicted_total``                  counter    KV blocks dropped from block lists
``kvevict_eviction_seconds``                      histogram  time of one eviction pass (scoring,
                                                             selection, compaction)
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

Recorded in the engine core by the connector's two halves (the scheduler side records what
reached vLLM's pool, once per request eviction; the worker side scoring time and failures)
into an :class:`EvictionStatsRecorder`; the connector's ``get_kv_connector_stats`` drains it,
and its ``build_prom_metrics`` / ``build_kv_connector_stats`` classmethods are
:func:`build_prom_metrics` and :func:`build_kv_connector_stats`.
The ``rejected`` outcome happens in the API server (HTTP 400), the process that serves
``/metrics``: :func:`record_rejected` counts it there directly.
"""

from __future__ import annotations

from typing import Any, Optional

from vllm_kvevict.vllm.metrics.held import HeldTokens
from vllm_kvevict.vllm.metrics.prometheus import EvictionPromMetrics, build_prom_metrics, record_rejected
from vllm_kvevict.vllm.metrics.stats import (
    ERROR_STAGES,
    OTHER,
    OUTCOMES,
    EvictionStats,
    EvictionStatsRecorder,
    bounded_labels,
    build_kv_connector_stats,
)


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


__all__ = [
    "ERROR_STAGES",
    "OTHER",
    "OUTCOMES",
    "EvictionPromMetrics",
    "EvictionStats",
    "EvictionStatsRecorder",
    "HeldTokens",
    "bounded_labels",
    "build_kv_connector_stats",
    "build_prom_metrics",
    "pool_geometry",
    "record_rejected",
    "requested_labels",
]
