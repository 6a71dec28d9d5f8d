"""The ``kvevict_*`` Prometheus series in vLLM's front-end (the API server process)."""

from __future__ import annotations

from typing import Any, Optional

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, PromMetric, PromMetricT
from vllm.v1.metrics.utils import create_metric_per_engine

from vllm_kvevict.vllm.metrics.stats import (
    _BLOCKS_RETURNED,
    _BYTES_RETURNED,
    _DECODE,
    _ERRORS,
    _EVICTIONS,
    _HEADS,
    _HELD,
    _MEMORY,
    _OUTCOMES,
    _POOL,
    _SCORING,
    ERROR_STAGES,
    EVICTION_SECONDS_BUCKETS,
    HEAD_STATS,
    HEAD_TOKENS_BUCKETS,
    PREFIX,
    RATIO_BUCKETS,
    SCORING_SECONDS_BUCKETS,
    bounded_labels,
)

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
            "requests", "Requests by eviction outcome (evicted, skipped_short, opted_out, rejected, error, decode_only).",
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
        self.decode_evictions = self._counter(
            "decode_evictions", "Decode-time evictions (every decode_interval generated tokens).", policy_labels
        )
        self.decode_blocks_returned = self._counter(
            "decode_blocks_returned", "KV-cache blocks returned to vLLM's pool by decode-time evictions.",
            policy_labels,
        )  # fmt: skip
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
        cache = getattr(vllm_config, "cache_config", None)  # the engine sends exact ones at its first step
        block_bytes = block_bytes_of(vllm_config)
        for idx in per_engine_labelvalues:
            if getattr(cache, "num_gpu_blocks", None):
                self.cache_blocks[idx].set(cache.num_gpu_blocks)
            if getattr(cache, "block_size", None):
                self.block_size[idx].set(cache.block_size)
            if block_bytes:
                self.block_bytes[idx].set(block_bytes)
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
        for *labels, evictions, blocks in data.get(_DECODE, []):
            policy, granularity = labels if len(labels) == 2 else (labels[0], "page")
            self.decode_evictions.labels(*engine, policy, granularity).inc(evictions)
            self.decode_blocks_returned.labels(*engine, policy, granularity).inc(blocks)
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


def block_bytes_of(vllm_config: Any) -> int:
    """KV-cache bytes one block id holds over all layers, from the model's shape (the engine's
    exact figure, from its KV-cache tensors, replaces it with its first stats); 0 if unknown."""
    try:
        from vllm.utils.torch_utils import get_dtype_size

        model, cache, parallel = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
        dtype = model.dtype if cache.cache_dtype == "auto" else cache.cache_dtype
        if isinstance(dtype, str):
            from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

            dtype = STR_DTYPE_TO_TORCH_DTYPE[dtype]
        per_token = 2 * model.get_num_kv_heads(parallel) * model.get_head_size() * get_dtype_size(dtype)
        return int(model.get_num_layers(parallel) * cache.block_size * per_token)
    except Exception:
        return 0


def build_prom_metrics(
    vllm_config: Any,
    metric_types: dict[type[PromMetric], type[PromMetricT]],
    labelnames: list[str],
    per_engine_labelvalues: dict[int, list[object]],
) -> EvictionPromMetrics:
    """For the connector's ``build_prom_metrics`` classmethod."""
    return EvictionPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)


def _unregister(name: str) -> None:
    """Drop an earlier collector of ``name`` (vLLM only unregisters ``vllm:`` names itself)."""
    from prometheus_client import REGISTRY

    for collector, names in list(REGISTRY._collector_to_names.items()):
        if name in names or any(n.startswith(name + "_") for n in names):
            REGISTRY.unregister(collector)
