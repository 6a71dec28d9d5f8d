"""The KV-connector messages: worker metadata merge, stats, scheduler-side bookkeeping."""

from __future__ import annotations

from types import SimpleNamespace

from vllm_kvevict.vllm.connector import KVEvictWorkerMetadata


def test_worker_metadata_merges_ranks_and_refuses_disagreement():
    a = KVEvictWorkerMetadata(evicted={"r1": [0, 1], "r2": [3]})
    b = KVEvictWorkerMetadata(evicted={"r1": [0, 1], "r3": [5]})
    assert a.aggregate(b).evicted == {"r1": [0, 1], "r2": [3], "r3": [5]}
    c = KVEvictWorkerMetadata(evicted={"r1": [0, 2]})
    assert a.aggregate(c).evicted["r1"] == []  # ranks disagree: evict nothing rather than mix


def test_report_about_an_earlier_admission_is_dropped(monkeypatch):
    """Async scheduling: a report arriving after the request was preempted and re-admitted
    must not null the blocks of its new admission."""
    from vllm_kvevict.vllm import connector as mod
    from vllm_kvevict.vllm.manager import SchedulerEvictionState

    calls = []
    monkeypatch.setattr(mod, "evict_blocks", lambda mgr, req_id, blocks: calls.append(req_id) or len(blocks))
    conn = object.__new__(mod.KVEvictConnector)  # scheduler-side state only; no vLLM config needed
    conn.scheduler_state, conn._generation = SchedulerEvictionState(), {}
    conn._kv_cache_manager = SimpleNamespace(coordinator=SimpleNamespace(single_type_managers=[SimpleNamespace(block_size=16)]))

    def schedule(new=(), resumed=(), preempted=(), finished=()):
        return conn.build_connector_meta(
            SimpleNamespace(
                finished_req_ids=set(finished),
                preempted_req_ids=set(preempted),
                scheduled_new_reqs=[SimpleNamespace(req_id=r) for r in new],
                scheduled_cached_reqs=SimpleNamespace(resumed_req_ids=set(resumed)),
            )
        )

    meta = schedule(new=["a", "b"])
    assert meta.generations == {"a": 1, "b": 1} and meta.reset_req_ids == {"a", "b"}
    meta = schedule(preempted=["a"], finished=["f"])
    assert meta.reset_req_ids == {"a", "f"} and meta.generations == {}
    assert schedule(resumed=["a"]).generations == {"a": 2}
    # both reports were made in the first admission; a's is stale now
    report = KVEvictWorkerMetadata(
        evicted={"a": [1], "b": [2, 3]}, generations={"a": 1, "b": 1}, passes={"b": ("snapkv", 0.01)}
    )
    conn.update_connector_output(SimpleNamespace(kv_connector_worker_meta=report))
    assert calls == ["b"]
    assert conn.scheduler_state.frozen == {"b"} and conn.scheduler_state.blocks_returned == 2
    stats = conn.eviction_stats.take().reduce()  # the kvevict_* metrics' source (metrics.py)
    assert stats["kvevict requests evicted"] == 1 and stats["kvevict blocks evicted"] == 2
    assert stats["kvevict tokens evicted"] == 32 and stats["kvevict blocks returned"] == 2
    report = KVEvictWorkerMetadata(evicted={"a": [4]}, generations={"a": 2})
    conn.update_connector_output(SimpleNamespace(kv_connector_worker_meta=report))
    assert calls == ["b", "a"]
