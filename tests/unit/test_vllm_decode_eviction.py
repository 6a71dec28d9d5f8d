"""Decode-time eviction (page granularity) piece by piece: the worker's plans, observations and
evictions on a real vLLM CPU cache, the report's merge, the stricter override, and the
reference engine's decode loop on the tiny Llama."""

from __future__ import annotations

import math

import pytest
import torch
from test_vllm_layouts import BS, D, G, HKV
from test_vllm_worker_side import LAYERS, MODEL, _receive, _row, _side

from vllm_kvevict.config import EvictionConfig, EvictionConfigError
from vllm_kvevict.vllm.backends.decode_observe import observe_decode_rows
from vllm_kvevict.vllm.channel import Admission, KVEvictWorkerMetadata
from vllm_kvevict.vllm.worker.requests import OBSERVING, PAGE

PROMPT = 64
DECODE_CFG = EvictionConfig.from_flat({"kv_eviction": "snapkv", "kv_granularity": "page", "kv_budget": 64,
                                       "kv_window": 8, "kv_decode_interval": 16, "kv_prompt_eviction": "off"})


def _forward(side, num_queries: int) -> None:
    """What the attention impl does for the step's decode rows, every layer."""
    step = side.current_step()
    query = torch.randn(num_queries, HKV * G * D)
    for layer in range(LAYERS):
        name = f"model.layers.{layer}.self_attn.attn"
        observe_decode_rows(step, name, layer, query, side._kv_caches[name], side._layouts[name], HKV * G, 0.125)


def test_prompt_off_then_every_interval_scores_the_held_tokens_and_evicts_back_to_the_budget():
    side = _side()
    _receive(side, {"r": Admission(DECODE_CFG, PROMPT, 1)})
    side.plan([_row("r", 0, PROMPT)], MODEL)
    state = side.table.get("r")
    assert state.status == PAGE and state.observations is None and not side.current_step().observe
    side.finish()
    for n in range(16):  # decode steps: positions 64 .. 79
        side.plan([_row("r", PROMPT + n, 1)], MODEL)
        row = side.current_step().decode[0]
        assert row.score == (n == 15) and row.seq_len == PROMPT + n + 1
        _forward(side, 1)
        done = side.finish()
        assert not done.decode_failed
    assert state.decode.queries[0].shape == (8, HKV * G, D)  # the last `window` queries
    # held 80 tokens (blocks 0, 1, 2), budget 64: keep 2 blocks, the window's block is required
    from vllm_kvevict.policies import build_policy

    record = side.recorder.decode["r"][0]
    assert record["held_blocks"] == [0, 1, 2]
    chosen = build_policy(DECODE_CFG, BS).evicted_blocks(record["scores"], 80, budget=64)
    assert len(chosen) == 1 and chosen[0] in (0, 1)
    gone = chosen[0]
    assert state.evicted.tolist() == [gone] == record["evicted"]
    report = side.take_report()
    assert report.decode_evicted == {"r": [gone]} and report.decode_count == {"r": 1}
    side.plan([_row("r", 80, 1)], MODEL)
    step = side.current_step()
    held = [b for b in range(3) if b != gone]  # 81 tokens: blocks 0 .. 2
    assert step.table_rows[0].seq_len == 81 - BS  # the stock kernel skips the evicted block
    assert step.table_rows[0].block_ids.tolist() == [b + 1 for b in held]
    row = step.decode[0]
    assert row.held_index.tolist() == held and not row.score
    assert row.positions.tolist() == [p for p in range(81) if p // BS != gone]  # true positions (RoPE)


def test_a_failed_decode_scoring_skips_that_eviction_and_keeps_what_is_held():
    side = _side()
    _receive(side, {"r": Admission(DECODE_CFG, PROMPT, 1)})
    side.plan([_row("r", 0, PROMPT)], MODEL)
    side.finish()
    for n in range(16):
        side.plan([_row("r", PROMPT + n, 1)], MODEL)
        if n < 15:
            _forward(side, 1)  # the scoring step's forward never happens: no scores
        done = side.finish()
    assert done.decode_failed == {"r": ("snapkv", "page", "scoring")}
    state = side.table.get("r")
    assert state.status == PAGE and state.evicted.numel() == 0 and state.decode_from == 80
    assert side.take_report() is None


def test_prompt_on_is_observed_first():
    cfg = EvictionConfig.from_flat({"kv_eviction": "snapkv", "kv_granularity": "page", "kv_budget": 64,
                                    "kv_window": 8, "kv_decode_interval": 16})
    side = _side()
    _receive(side, {"r": Admission(cfg, PROMPT, 1)})
    side.plan([_row("r", 0, PROMPT)], MODEL)
    assert side.table.get("r").status == OBSERVING and side.current_step().observe[0].score


def test_reports_of_several_steps_union_their_blocks_and_add_their_counts():
    a = KVEvictWorkerMetadata(decode_evicted={"r": [1, 4]}, decode_count={"r": 1})
    a.merge(KVEvictWorkerMetadata(decode_evicted={"r": [6]}, decode_count={"r": 1}))
    assert a.decode_evicted == {"r": [1, 4, 6]} and a.decode_count == {"r": 2} and not a.is_empty()
    assert not KVEvictWorkerMetadata(decode_evicted={"r": []}, decode_count={"r": 1}).is_empty()


def test_stricter_requests_may_not_evict_less_often_or_keep_the_prompt():
    from vllm_kvevict.vllm.api import request_config

    server = EvictionConfig.from_flat({"kv_eviction": "snapkv", "kv_granularity": "page", "kv_budget": 256,
                                       "kv_decode_interval": 64, "kv_request_override": "stricter"})
    assert request_config({"kv_decode_interval": 32}, server).decode_interval == 32
    for xargs, field in (({"kv_decode_interval": 128}, "kv_decode_interval"),
                         ({"kv_decode_interval": 0}, "kv_decode_interval"),
                         ({"kv_prompt_eviction": "off"}, "kv_prompt_eviction")):
        with pytest.raises(EvictionConfigError, match=field):
            request_config(xargs, server)


def test_a_request_changing_scorer_drops_decode_settings_its_scorer_does_not_read():
    server = EvictionConfig.from_flat({"kv_eviction": "snapkv", "kv_granularity": "page", "kv_budget": 256,
                                       "kv_decode_interval": 64, "kv_prompt_eviction": "off"})
    other = EvictionConfig.from_flat({"kv_eviction": "expected_attention", "kv_granularity": "page"}, base=server)
    assert other.decode_interval == 0 and other.prompt_eviction == "on"
    h2o = EvictionConfig.from_flat({"kv_eviction": "h2o"}, base=server)  # reads them (page granularity)
    assert h2o.decode_interval == 64 and h2o.prompt_eviction == "off"
    with pytest.raises(EvictionConfigError, match="kv_decode_interval=10: not read by none"):
        EvictionConfig.from_flat({"kv_decode_interval": 10})


# --------------------------------------------------------------------- the reference engine
REF_BS, REF_PROMPT, REF_NEW = 16, 100, 90


@pytest.fixture(scope="module")
def ref_prefilled(tiny_engine):
    torch.manual_seed(3)
    return tiny_engine.prefill(torch.randint(100, 5000, (REF_PROMPT,)))


def _ref_config(**flat) -> EvictionConfig:
    return EvictionConfig.from_flat({"kv_eviction": "snapkv", "kv_granularity": "page", "kv_window": 8,
                                     "kv_decode_interval": 24, **flat})


def test_reference_cap_evicts_every_interval_and_stays_bounded(tiny_engine, ref_prefilled, one_torch_thread):
    config = _ref_config(kv_budget=48)
    gen = tiny_engine.generate(ref_prefilled, config, REF_NEW, stop_on_eos=False, block_size=REF_BS, return_cache=True)
    seq_lens = [e.seq_len for e in gen.decode_evictions]
    assert seq_lens == [REF_PROMPT + 24 * k for k in range(1, (REF_NEW - 1) // 24 + 1)]
    for e in gen.decode_evictions:
        assert len(e.held_blocks) - len(e.evicted) <= math.ceil(48 / REF_BS) + 2
        assert set(e.evicted) <= set(e.held_blocks)
    positions = gen.cache.stores[0][0].positions
    assert torch.equal(positions, torch.sort(positions).values)  # true positions, in order
    assert int(positions[-1]) == REF_PROMPT + REF_NEW - 2  # the last token run
    evicted = {b for e in gen.decode_evictions for b in e.evicted}
    assert not any(int(p) // REF_BS in evicted for p in positions)


def test_reference_forced_to_evict_nothing_equals_the_full_cache(tiny_engine, ref_prefilled, one_torch_thread):
    """The decode loop itself changes nothing: prompt kept, every eviction forced empty."""
    config = _ref_config(kv_budget=48, kv_prompt_eviction="off")
    forced = tiny_engine.generate(ref_prefilled, config, REF_NEW, stop_on_eos=False, block_size=REF_BS,
                                  decode_choices=lambda i, e: [], return_logits=True)
    full = tiny_engine.generate(ref_prefilled, EvictionConfig(), REF_NEW, stop_on_eos=False, return_logits=True)
    assert len(forced.decode_evictions) == 3
    assert forced.token_ids == full.token_ids
    assert torch.allclose(forced.logits, full.logits, atol=1e-5)
