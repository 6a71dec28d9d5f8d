"""The scheduler half of the connector: admissions carry resolved policies, stale reports are
dropped, and worker reports merge."""

from __future__ import annotations

from types import SimpleNamespace

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.vllm.channel import KVEvictWorkerMetadata
from vllm_kvevict.vllm.metrics import EvictionStatsRecorder
from vllm_kvevict.vllm.scheduler import side as side_mod
from vllm_kvevict.vllm.scheduler.side import SchedulerSide

SERVER = EvictionConfig.from_flat({"kv_eviction": "snapkv", "kv_budget": 0.2, "kv_granularity": "page"})


def _request(req_id, prompt_len=100, **extra):
    return SimpleNamespace(request_id=req_id, num_prompt_tokens=prompt_len, num_tokens=prompt_len,
                           num_computed_tokens=prompt_len, sampling_params=SimpleNamespace(extra_args=extra or None))


def _schedule(side, new=(), resumed=(), preempted=(), finished=()):
    return side.build_metadata(SimpleNamespace(
        finished_req_ids=set(finished), preempted_req_ids=set(preempted),
        scheduled_new_reqs=[SimpleNamespace(req_id=r, num_computed_tokens=0) for r in new],
        scheduled_cached_reqs=SimpleNamespace(resumed_req_ids=set(resumed), req_ids=[], num_computed_tokens=[]),
        num_scheduled_tokens={},
    ))


def _side(monkeypatch, calls):
    monkeypatch.setattr(side_mod, "evict_blocks", lambda mgr, req_id, blocks: calls.append(req_id) or len(blocks))
    monkeypatch.setattr(side_mod, "held_block_count", lambda mgr, req_id: 3)
    side = SchedulerSide(SERVER, EvictionStatsRecorder(), num_layers=2, num_kv_heads=2)
    side.manager = object()  # the block moves are patched out; vLLM's own manager: test_vllm_scheduler_blocks
    monkeypatch.setattr(SchedulerSide, "block_size", property(lambda self: 16))
    return side


def test_admissions_carry_the_resolved_policy_once(monkeypatch):
    side = _side(monkeypatch, [])
    for req in (_request("a"), _request("b", kv_eviction="none"), _request("c", kv_budget=0.5)):
        side.note_allocation(req)
    meta = _schedule(side, new=["a", "b", "c"])
    assert set(meta.admissions) == {"a", "c"}  # b opted out: nothing to send
    assert meta.admissions["a"].config == SERVER and meta.admissions["c"].config.budget == 0.5
    assert meta.admissions["a"].prompt_len == 100 and meta.admissions["a"].generation == 1
    assert side.stats.take().data["outcomes"] == [["none", "page", "opted_out"]]
    side.note_allocation(_request("b", kv_eviction="none"))  # resumed: counted once
    assert side.stats.take() is None


def test_a_request_evicting_only_during_decode_is_counted_decode_only(monkeypatch):
    side = _side(monkeypatch, [])
    side.note_allocation(_request("d", kv_decode_interval=64, kv_prompt_eviction="off"))
    side.note_allocation(_request("h", kv_granularity="head", kv_allocation="adakv", kv_decode_interval=64,
                                  kv_prompt_eviction="off"))
    side.note_allocation(_request("both", kv_decode_interval=64))  # its prompt's eviction has an outcome
    assert side.stats.take().data["outcomes"] == [["snapkv", "page", "decode_only"], ["snapkv", "head", "decode_only"]]
    _schedule(side, new=["d", "h", "both"])
    side.note_allocation(_request("d", kv_decode_interval=64, kv_prompt_eviction="off"))  # resumed
    assert side.stats.take() is None


def test_report_about_an_earlier_admission_is_dropped(monkeypatch):
    """Async scheduling: a report arriving after the request was preempted and re-admitted
    must not null the blocks of its new admission."""
    calls = []
    side = _side(monkeypatch, calls)
    side.note_allocation(_request("a"))
    side.note_allocation(_request("b"))
    meta = _schedule(side, new=["a", "b"])
    assert {r: a.generation for r, a in meta.admissions.items()} == {"a": 1, "b": 1}
    assert meta.reset_req_ids == {"a", "b"}
    meta = _schedule(side, preempted=["a"], finished=["f"])
    assert meta.reset_req_ids == {"a", "f"} and not meta.admissions
    assert _schedule(side, resumed=["a"]).admissions["a"].generation == 2
    # both reports were made in the first admission; a's is stale now
    side.apply_report(KVEvictWorkerMetadata(evicted={"a": [1], "b": [2, 3]}, generations={"a": 1, "b": 1},
                                            passes={"b": ("snapkv", 0.01)}))
    assert calls == ["b"]
    assert side.state.frozen == {"b"} and side.state.blocks_returned == 2
    stats = side.stats.take().reduce()  # the kvevict_* metrics' source
    assert stats["kvevict requests evicted"] == 1 and stats["kvevict blocks evicted"] == 2
    assert stats["kvevict tokens evicted"] == 32 and stats["kvevict blocks returned"] == 2
    side.apply_report(KVEvictWorkerMetadata(evicted={"a": [4]}, generations={"a": 2}))
    assert calls == ["b", "a"]


def test_worker_reports_merge_and_ranks_that_disagree_evict_nothing():
    a = KVEvictWorkerMetadata(evicted={"r1": [0, 1], "r2": [3]})
    b = KVEvictWorkerMetadata(evicted={"r1": [0, 1], "r3": [5]})
    assert a.aggregate(b).evicted == {"r1": [0, 1], "r2": [3], "r3": [5]}
    assert a.aggregate(KVEvictWorkerMetadata(evicted={"r1": [0, 2]})).evicted["r1"] == []
    later = KVEvictWorkerMetadata(head_failed={"x"}, generations={"x": 3})
    a.merge(later)
    assert a.head_failed == {"x"} and a.generations["x"] == 3 and not a.is_empty()
