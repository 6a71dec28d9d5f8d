"""kvevict_* metrics: EvictionStats through vLLM's serialisation and its real Prometheus logger."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from prometheus_client import REGISTRY, generate_latest  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1  # noqa: E402

from vllm_kvevict.vllm.metrics import (  # noqa: E402
    OTHER,
    EvictionMetricsMixin,
    EvictionStats,
    EvictionStatsRecorder,
)


class MetricsOnlyConnector(EvictionMetricsMixin, KVConnectorBase_V1):
    """Only its class methods are used: vLLM's front-end resolves the class, never builds it."""


def sample_stats() -> EvictionStats:
    stats = EvictionStats()
    stats.record("snapkv", "page", tokens=1800, blocks=56, seconds=0.004)
    stats.record("snapkv", "page", tokens=200, blocks=6, seconds=0.002)
    stats.record("tova", "head", tokens=100, blocks=3, seconds=0.3)
    stats.record_blocks_returned(60)
    return stats


def test_stats_record_aggregate_reduce():
    stats = sample_stats()
    assert not stats.is_empty() and EvictionStats().is_empty()
    other = EvictionStats()
    other.record_blocks_returned(5)
    other.record_blocks_returned(0)  # nothing returned: nothing recorded
    stats.aggregate(other).aggregate(EvictionStats())
    assert stats.reduce() == {
        "kvevict requests evicted": 3,
        "kvevict tokens evicted": 2100,
        "kvevict blocks evicted": 65,
        "kvevict blocks returned": 65,
        "kvevict eviction seconds": 0.306,
    }


def test_labels_stay_bounded():
    stats = EvictionStats()
    stats.record("req-1234", "token", tokens=1, blocks=1, seconds=0.0)
    assert stats.data["evictions"][0][:2] == [OTHER, OTHER]


def test_recorder_take_drains():
    recorder = EvictionStatsRecorder()
    assert recorder.take() is None
    recorder.record("snapkv", "page", 10, 1, 0.001)
    recorder.record_blocks_returned(1)
    taken = recorder.take()
    assert taken.reduce()["kvevict blocks returned"] == 1
    assert recorder.take() is None


def test_stats_survive_vllm_engine_core_serialisation():
    """Engine core -> front-end: SchedulerStats.kv_connector_stats inside EngineCoreOutputs."""
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.metrics.stats import SchedulerStats
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    stats = sample_stats()
    outputs = EngineCoreOutputs(scheduler_stats=SchedulerStats(kv_connector_stats=stats.to_dict()))
    decoded = MsgpackDecoder(EngineCoreOutputs).decode(MsgpackEncoder().encode(outputs))
    data = decoded.scheduler_stats.kv_connector_stats
    assert MetricsOnlyConnector.build_kv_connector_stats(data).reduce() == stats.reduce()


def test_mixin_connector_stats():
    connector = type("StatsOnly", (EvictionMetricsMixin,), {})()  # the mixin needs no vLLM state
    assert connector.get_kv_connector_stats() is None
    connector.eviction_stats.record("snapkv", "page", 10, 1, 0.001)
    assert connector.get_kv_connector_stats().reduce()["kvevict requests evicted"] == 1
    assert connector.get_kv_connector_stats() is None


def sample(name: str, **labels: str) -> float:
    """The value of one scraped sample of the default registry (what /metrics serves)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = generate_latest(REGISTRY).decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    raise KeyError(f"{name}{labels} not scraped")


def test_vllm_prometheus_logger_exports_kvevict_series(tiny_llama_dir):
    """vLLM's own PrometheusStatLogger, with a KV connector using the mixin, fed SchedulerStats."""
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.metrics.loggers import PrometheusStatLogger
    from vllm.v1.metrics.stats import SchedulerStats

    vllm_config = EngineArgs(
        model=str(tiny_llama_dir),
        dtype="float32",
        max_model_len=256,
        served_model_name="tiny",
        kv_transfer_config=KVTransferConfig(
            kv_connector="MetricsOnlyConnector", kv_role="kv_both", kv_connector_module_path=__name__
        ),
    ).create_engine_config()
    PrometheusStatLogger(vllm_config)  # a second logger in one process must not clash
    logger = PrometheusStatLogger(vllm_config)
    logger.record(SchedulerStats(kv_connector_stats=sample_stats().to_dict()), None, engine_idx=0)
    logger.record(SchedulerStats(kv_connector_stats=sample_stats().to_dict()), None, engine_idx=0)

    page = dict(model_name="tiny", engine="0", policy="snapkv", granularity="page")
    assert sample("kvevict_requests_evicted_total", **page) == 4
    assert sample("kvevict_tokens_evicted_total", **page) == 4000
    assert sample("kvevict_blocks_evicted_total", **page) == 124
    assert sample("kvevict_eviction_seconds_count", **page) == 4
    head = dict(model_name="tiny", engine="0", policy="tova", granularity="head")
    assert sample("kvevict_eviction_seconds_bucket", **head, le="0.25") == 0
    assert sample("kvevict_eviction_seconds_bucket", **head, le="0.5") == 2
    assert sample("kvevict_blocks_returned_total", model_name="tiny", engine="0") == 120
    assert "req-" not in generate_latest(REGISTRY).decode()
