"""The worker half, step by step, on real vLLM CPU caches: admissions, plans, observations,
evictions, and every compaction order settled within its step (failures give blocks back)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_vllm_layouts import BS, D, HKV, cpu_cache

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.vllm.channel import Admission, KVEvictConnectorMetadata
from vllm_kvevict.vllm.model_info import ModelInfo
from vllm_kvevict.vllm.worker.planner import BatchRow
from vllm_kvevict.vllm.worker.requests import HEAD, OBSERVING, PAGE, WHOLE
from vllm_kvevict.vllm.worker.side import EvictionRecorder, WorkerSide

PROMPT, LAYERS = 320, 2
# floor off: the 100-token prompts here would keep everything under the default floor
PAGE_CFG = EvictionConfig.from_flat(
    {"kv_eviction": "snapkv", "kv_budget": 0.25, "kv_min_tokens": 0, "kv_window": 8, "kv_granularity": "page"}
)
HEAD_CFG = EvictionConfig.from_flat({"kv_eviction": "snapkv", "kv_budget": 0.25, "kv_min_tokens": 0, "kv_window": 8})


def _side(caches: dict | None = None) -> WorkerSide:
    side = WorkerSide()
    layout = cpu_cache(torch.zeros(1, HKV, D), torch.zeros(1, HKV, D), torch.tensor([1]), 2)[1]
    names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
    side.bind_layout(names, layout)
    side.register_kv_caches(caches or {n: torch.zeros(48, HKV, BS, 2 * D) for n in names})
    side.recorder = EvictionRecorder()
    return side


def _receive(side, admissions=(), resets=(), orders=None):
    side.receive(KVEvictConnectorMetadata(reset_req_ids=set(resets), admissions=dict(admissions),
                                          compact_orders=dict(orders or {})))


def _row(req_id, computed, queries, offset=0, blocks=None):
    table = blocks if blocks is not None else torch.arange(1, 1 + 16, dtype=torch.int32)
    return BatchRow(req_id, computed, queries, offset, table)


MODEL = ModelInfo(None, LAYERS)


def test_chunks_are_observed_then_scored_in_the_last_one():
    side = _side()
    _receive(side, {"r": Admission(PAGE_CFG, PROMPT, 1)})
    side.plan([_row("r", 0, 256)], MODEL)
    assert side.current_step() is not None and not side.current_step().observe  # no window position yet
    side.finish()
    side.plan([_row("r", 256, 64, offset=3)], MODEL)
    obs = side.current_step().observe[0]
    assert obs.score and obs.window == (64 - 8, 64) and obs.query_offset == 3 and obs.num_queries == 64
    assert obs.block_ids.tolist() == list(range(1, 11))  # the prompt's 10 blocks


def test_missing_scores_leave_the_request_whole_and_the_order_goes_back():
    """Item 6 of issue 13: a failure after the forward (e.g. no layer scored) must not keep the
    K compact blocks held until the request ends."""
    side = _side()
    _receive(side, {"r": Admission(HEAD_CFG, PROMPT, 1)}, orders={"r": [40, 41, 42]})
    side.plan([_row("r", 0, PROMPT)], MODEL)
    done = side.finish()
    assert "r" in done.failed and side.table.get("r").status == WHOLE
    report = side.take_report()
    assert report.head_failed == {"r"} and report.generations["r"] == 1 and not report.head_compacted
    side.plan([_row("r", PROMPT, 1)], MODEL)
    assert not side.current_step()  # a whole request: nothing to do in later steps


def test_an_order_for_a_request_not_scored_this_step_goes_back():
    side = _side()
    _receive(side, {"r": Admission(HEAD_CFG, PROMPT, 1)}, orders={"r": [40], "gone": [41]})
    side.plan([_row("r", 0, 64)], MODEL)  # not the last chunk
    side.finish()
    assert side.take_report().head_failed == {"r", "gone"}


def test_a_reset_forgets_the_request_and_a_restart_without_one_is_not_trusted():
    side = _side()
    _receive(side, {"r": Admission(PAGE_CFG, PROMPT, 1)})
    side.plan([_row("r", 0, 256)], MODEL)
    side.finish()
    side.plan([_row("r", 0, 256)], MODEL)  # the same chunk again: its blocks are new
    assert "r" not in side.table and not side.current_step()
    _receive(side, {"s": Admission(PAGE_CFG, PROMPT, 1)})
    _receive(side, resets={"s"})
    assert "s" not in side.table


@pytest.mark.parametrize("config", [PAGE_CFG, HEAD_CFG], ids=["page", "head"])
def test_scoring_step_evicts_through_the_backend_observation(config):
    """One scoring step through the real observation code and real policies: page granularity
    reports evicted blocks; head granularity compacts every layer into the ordered blocks."""
    from vllm_kvevict.vllm.backends.observe import observe_rows

    torch.manual_seed(0)
    keys, values = torch.randn(PROMPT, HKV, D), torch.randn(PROMPT, HKV, D)
    table = torch.arange(1, 11, dtype=torch.int32)
    caches, layout = {}, None
    for i in range(LAYERS):
        kv, layout = cpu_cache(keys + i, values - i, table, num_blocks=48)
        caches[f"model.layers.{i}.self_attn.attn"] = kv
    side = _side(caches)
    orders = {"r": [40, 41, 42, 43]} if config is HEAD_CFG else {}
    _receive(side, {"r": Admission(config, PROMPT, 1)}, orders=orders)
    side.plan([_row("r", 0, PROMPT, blocks=torch.cat([table, torch.zeros(6, dtype=torch.int32)]))], MODEL)
    step = side.current_step()
    query = torch.randn(PROMPT, HKV * 3 * D)
    for i, (name, kv) in enumerate(caches.items()):
        observe_rows(step, name, i, query, kv, layout, HKV * 3, D ** -0.5)
    assert step.observe[0].sink.error is None
    done = side.finish()
    report = side.take_report()
    assert not done.failed and report.generations == {"r": 1}
    state = side.table.get("r")
    if config is PAGE_CFG:
        assert state.status == PAGE and report.evicted["r"] == side.recorder.evicted["r"] and report.evicted["r"]
    else:
        assert state.status == HEAD and not report.head_failed
        kept = side.recorder.kept["r"]
        assert report.head_compacted["r"] == kept.head_budgets.flatten().tolist()
        region = state.region
        for i, kv in enumerate(caches.values()):
            got_k, _ = layout.read_region(kv, region.block[i], region.plane[i], region.slot[i])
            want = torch.cat([(keys + i)[kept.indices[i][g], g] for g in range(HKV)])
            assert torch.equal(got_k, want)
        side.plan([_row("r", PROMPT, 1, offset=0, blocks=torch.cat([table, torch.tensor([44], dtype=torch.int32)]))],
                  MODEL)
        head = side.current_step().head_rows[0]
        assert head.region is region and head.seq_len == PROMPT + 1
        table_row = side.current_step().table_rows[0]
        assert table_row.block_ids.tolist() == [44] and table_row.seq_len == 1  # the stock kernel: the tail only
    assert OBSERVING != state.status


def test_the_connector_counts_each_failure_with_its_stage():
    from vllm_kvevict.vllm.connector import KVEvictConnector
    from vllm_kvevict.vllm.metrics import EvictionStatsRecorder
    from vllm_kvevict.vllm.worker.finish import FinishedStep

    done = FinishedStep(scored={"a": ("snapkv", "head", 0.5), "b": ("snapkv", "page", 0.1)},
                        failed={"a": ("snapkv", "head", "compaction")})
    connector = object.__new__(KVEvictConnector)  # the worker half only; no vLLM config needed
    connector.stats = EvictionStatsRecorder()
    connector.eviction_steps = SimpleNamespace(finish=lambda: done)
    connector.wait_for_save()
    data = connector.stats.take().data
    assert data["errors"] == ["compaction"]
    assert data["outcomes"] == [["snapkv", "head", "error"]]
    assert data["scoring"] == [["snapkv", "page", 0.1]]  # a failed request's time is not a scoring time
