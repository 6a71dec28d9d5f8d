"""kvevict_* metrics: EvictionStats through vLLM's serialisation and its real Prometheus logger."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from prometheus_client import REGISTRY, generate_latest  # noqa: E402

from vllm_kvevict.config import EvictionConfig  # noqa: E402
from vllm_kvevict.vllm import metrics  # noqa: E402
from vllm_kvevict.vllm.metrics import prometheus  # noqa: E402
from vllm_kvevict.vllm.metrics import (  # noqa: E402
    OTHER,
    EvictionStats,
    EvictionStatsRecorder,
    HeldTokens,
    pool_geometry,
    record_rejected,
    requested_labels,
)


def sample_stats() -> EvictionStats:
    stats = EvictionStats()
    stats.record("snapkv", "page", tokens=1800, blocks=56, seconds=0.004)
    stats.record("snapkv", "page", tokens=200, blocks=6, seconds=0.002)
    stats.record("tova", "head", tokens=100, blocks=3, seconds=0.3)
    stats.record_blocks_returned(60, num_bytes=60 * 1024)
    stats.record_outcome("snapkv", "page", "skipped_short")
    stats.record_outcome("none", "page", "opted_out")
    stats.record_scoring("snapkv", "page", 0.02)
    stats.record_memory("snapkv", "page", ideal_blocks=7, held_blocks=8, logical_tokens=2000, kept_tokens=200)
    stats.record_head_budgets("tova", "head", [10, 20, 60])
    stats.record_error("scoring")
    stats.record_decode_evictions("snapkv", evictions=2, blocks=5)
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
        "kvevict errors": 1,
        "kvevict decode evictions": 2,
        "kvevict decode blocks returned": 5,
    }
    assert [o[2] for o in stats.data["outcomes"]] == ["evicted"] * 3 + ["skipped_short", "opted_out"]


def test_snapshots_make_stats_non_empty_and_the_later_one_wins():
    first, second = EvictionStats(), EvictionStats()
    first.set_held({("snapkv", "page"): (1000, 100)})
    second.set_held({("snapkv", "page"): (500, 50)})
    second.set_pool(num_blocks=100, block_size=32, bytes_per_block=4096)
    assert not first.is_empty()
    first.aggregate(second)
    assert first.data["held"] == [["snapkv", "page", 500, 50]]
    assert first.data["pool"] == [100, 32, 4096]


def test_labels_stay_bounded():
    stats = EvictionStats()
    stats.record("req-1234", "token", tokens=1, blocks=1, seconds=0.0)
    stats.record_error("req-1234")
    assert stats.data["evictions"][0][:2] == [OTHER, OTHER]
    assert stats.data["errors"] == [OTHER]
    with pytest.raises(ValueError):
        stats.record_outcome("snapkv", "page", "req-1234")


def test_recorder_take_drains():
    recorder = EvictionStatsRecorder()
    assert recorder.take() is None
    recorder.record("snapkv", "page", 10, 1, 0.001)
    recorder.record_blocks_returned(1)
    taken = recorder.take()
    assert taken.reduce()["kvevict blocks returned"] == 1
    assert "bytes_returned" not in taken.data or taken.data["bytes_returned"] == []  # pool unknown
    assert recorder.take() is None


def test_recorder_bytes_follow_the_pool_and_held_is_sent_on_change():
    recorder = EvictionStatsRecorder()
    recorder.set_pool(num_blocks=50, block_size=16, bytes_per_block=1000)
    recorder.record_blocks_returned(3)
    assert recorder.take().data["bytes_returned"] == [3000]
    recorder.set_held({("tova", "page"): (64, 32)})
    assert recorder.take().data["held"] == [["tova", "page", 64, 32]]
    recorder.set_held({("tova", "page"): (64, 32)})  # unchanged: nothing to send
    assert recorder.take() is None
    recorder.set_held({})
    assert recorder.take().data["held"] == []


def test_stats_survive_vllm_engine_core_serialisation():
    """Engine core -> front-end: SchedulerStats.kv_connector_stats inside EngineCoreOutputs."""
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.metrics.stats import SchedulerStats
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    stats = sample_stats()
    stats.set_held({("snapkv", "page"): (2000, 200)})
    stats.set_pool(100, 32, 4096)
    outputs = EngineCoreOutputs(scheduler_stats=SchedulerStats(kv_connector_stats=stats.to_dict()))
    decoded = MsgpackDecoder(EngineCoreOutputs).decode(MsgpackEncoder().encode(outputs))
    data = decoded.scheduler_stats.kv_connector_stats
    from vllm_kvevict.vllm.connector import KVEvictConnector

    rebuilt = KVEvictConnector.build_kv_connector_stats(data)
    assert rebuilt.reduce() == stats.reduce()
    assert rebuilt.data["held"] == [["snapkv", "page", 2000, 200]]
    assert rebuilt.data["head_budgets"] == [["tova", "head", [10, 20, 60]]]


def scheduler_request(req_id: str, prompt_len: int, extra_args=None):
    """A real vLLM scheduler ``Request``."""
    from vllm import SamplingParams
    from vllm.v1.request import Request

    return Request(req_id, list(range(prompt_len)), SamplingParams(max_tokens=4, extra_args=extra_args), None)


def test_held_tokens_follow_the_requests():
    held = HeldTokens()
    assert not held.used and held.totals() == {}
    a, b = scheduler_request("a", 1000), scheduler_request("b", 600)
    a.num_computed_tokens, b.num_computed_tokens = 1000, 600
    held.hold(a, "snapkv", "page", evicted_tokens=800)
    held.hold(b, "snapkv", "page", evicted_tokens=300)
    assert held.used and held.totals() == {("snapkv", "page"): (1600, 500)}
    a.num_computed_tokens = 1010  # decoding: logical and held grow together
    held.hold(b, "snapkv", "page", evicted_tokens=100)  # a second pass adds up
    assert held.totals() == {("snapkv", "page"): (1610, 410)}
    held.release("a")
    held.release("b")
    assert held.totals() == {}


def test_pool_geometry_of_a_real_kv_cache_config():
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, KVCacheTensor

    spec = FullAttentionSpec(block_size=32, num_kv_heads=3, head_size=64, dtype=torch.float32)
    layers = [f"model.layers.{i}.self_attn.attn" for i in range(30)]
    num_blocks = 100
    config = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[
            KVCacheTensor(size=spec.page_size_bytes * num_blocks, layers=[name], layer_stride=0, block_stride=spec.page_size_bytes)
            for name in layers
        ],
        kv_cache_groups=[KVCacheGroupSpec(layers, spec)],
    )
    assert spec.page_size_bytes == 2 * 3 * 64 * 4 * 32  # K and V of one layer
    assert pool_geometry(config) == (100, 32, 30 * spec.page_size_bytes)
    assert pool_geometry(None) is None


def test_requested_labels():
    default = EvictionConfig(scorer="snapkv", budget=1.0)
    assert requested_labels({"kv_eviction": "none"}, default) == ("none", "page")
    assert requested_labels({"kv_eviction": "tova", "kv_budget": 0.2}, default) == ("tova", "page")
    assert requested_labels({"kv_eviction": "tova", "kv_granularity": "head"}, default) == ("tova", "head")
    assert requested_labels({"kv_eviction": "req-77", "kv_budget": 9.5}, default)[0] == OTHER


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
    """vLLM's own PrometheusStatLogger, with our KV connector class (vLLM's front-end resolves the
    class and calls its classmethods, never builds it), fed SchedulerStats."""
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
            kv_connector="KVEvictConnector", kv_role="kv_both", kv_connector_module_path="vllm_kvevict.vllm.connector"
        ),
    ).create_engine_config()
    PrometheusStatLogger(vllm_config)  # a second logger in one process must not clash
    logger = PrometheusStatLogger(vllm_config)
    first = sample_stats()
    first.set_held({("snapkv", "page"): (2000, 200), ("tova", "head"): (100, 50)})
    first.set_pool(num_blocks=100, block_size=32, bytes_per_block=4096)
    logger.record(SchedulerStats(kv_connector_stats=first.to_dict()), None, engine_idx=0)
    second = sample_stats()
    second.set_held({("snapkv", "page"): (1000, 100)})  # the tova request finished
    logger.record(SchedulerStats(kv_connector_stats=second.to_dict()), None, engine_idx=0)

    engine = dict(model_name="tiny", engine="0")
    page = dict(**engine, policy="snapkv", granularity="page")
    head = dict(**engine, policy="tova", granularity="head")
    assert sample("kvevict_requests_evicted_total", **page) == 4
    assert sample("kvevict_tokens_evicted_total", **page) == 4000
    assert sample("kvevict_blocks_evicted_total", **page) == 124
    assert sample("kvevict_eviction_seconds_count", **page) == 4
    assert sample("kvevict_eviction_seconds_bucket", **head, le="0.25") == 0
    assert sample("kvevict_eviction_seconds_bucket", **head, le="0.5") == 2
    assert sample("kvevict_requests_total", **page, outcome="evicted") == 4
    assert sample("kvevict_requests_total", **page, outcome="skipped_short") == 2
    assert sample("kvevict_requests_total", **engine, policy="none", granularity="page", outcome="opted_out") == 2
    assert sample("kvevict_scoring_seconds_count", **page) == 2
    assert sample("kvevict_compression_ratio_bucket", **page, le="0.1") == 2
    assert sample("kvevict_compression_ratio_bucket", **page, le="0.05") == 0
    assert sample("kvevict_memory_efficiency_sum", **page) == pytest.approx(2 * 7 / 8)
    assert sample("kvevict_head_kept_tokens_count", **head) == 6
    assert sample("kvevict_head_kept_tokens_bucket", **head, le="16.0") == 2
    assert sample("kvevict_last_head_kept_tokens", **head, stat="min") == 10
    assert sample("kvevict_last_head_kept_tokens", **head, stat="mean") == 30
    assert sample("kvevict_last_head_kept_tokens", **head, stat="max") == 60
    assert sample("kvevict_logical_tokens", **page) == 1000
    assert sample("kvevict_held_tokens", **page) == 100
    assert sample("kvevict_held_tokens", **head) == 0  # gone from the snapshot: back to 0
    assert sample("kvevict_errors_total", **engine, stage="scoring") == 2
    assert sample("kvevict_decode_evictions_total", **page) == 4
    assert sample("kvevict_decode_blocks_returned_total", **page) == 10
    assert sample("kvevict_blocks_returned_total", **engine) == 120
    assert sample("kvevict_bytes_returned_total", **engine) == 120 * 1024
    assert sample("kvevict_cache_blocks", **engine) == 100
    assert sample("kvevict_block_size_tokens", **engine) == 32
    assert sample("kvevict_block_bytes", **engine) == 4096

    record_rejected("snapk", "page")  # the API server's HTTP 400, into the same family
    record_rejected("tova", "head")
    assert sample("kvevict_requests_total", **engine, policy=OTHER, granularity="page", outcome="rejected") == 1
    assert sample("kvevict_requests_total", **head, outcome="rejected") == 1
    assert prometheus._ACTIVE is logger.kv_connector_prom.prom_metrics
    assert "req-" not in generate_latest(REGISTRY).decode()
