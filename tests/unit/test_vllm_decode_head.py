"""Decode-time eviction at head granularity piece by piece, on a real vLLM CPU cache: the
worker recompacts a request's held tokens (positional at first, then compact region + tail)
into the ordered blocks, every kept entry copied from where it was held; the plan is the
shared one of the served scores; a failure gives the blocks back and keeps what is held; the
scheduler's interval and ``K'``; the reference engine's loop."""

from __future__ import annotations

import pytest
import torch
from test_vllm_decode_eviction import _forward
from test_vllm_layouts import BS, HKV
from test_vllm_worker_side import LAYERS, MODEL, _receive, _row, _side

from vllm_kvevict.cache import compact_blocks_needed
from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies import build_policy
from vllm_kvevict.policies.held import plan_held
from vllm_kvevict.vllm.channel import Admission
from vllm_kvevict.vllm.scheduler.recompaction import Recompactions
from vllm_kvevict.vllm.step import HeadDecodeRow
from vllm_kvevict.vllm.worker.requests import HEAD, PAGE

PROMPT = 64
CFG = EvictionConfig.from_flat({"kv_eviction": "snapkv", "kv_budget": 40, "kv_window": 8, "kv_decode_interval": 16,
                                "kv_prompt_eviction": "off", "kv_head_selection": "token"})
TABLE = torch.arange(1, 17, dtype=torch.int32)


def _caches():
    torch.manual_seed(0)
    names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
    return {n: torch.randn(48, HKV, BS, 2 * 64) for n in names}


def _decode_until(side, start: int, end: int, order: list[int], forward_last: bool = True):
    """Decode steps running positions ``start .. end - 1``; the last one carries ``order``."""
    for pos in range(start, end):
        last = pos == end - 1
        _receive(side, orders={"r": order} if last else None)
        side.plan([_row("r", pos, 1, blocks=TABLE)], MODEL)
        row = side.current_step().decode[0]
        assert isinstance(row, HeadDecodeRow) and row.score == last and row.seq_len == pos + 1
        if forward_last or not last:
            _forward(side, 1)
        done = side.finish()
    return done


def _positional(side, layer: int, g: int, positions: torch.Tensor):
    name = f"model.layers.{layer}.self_attn.attn"
    layout = side._layouts[name]
    block = TABLE.long()[positions // BS]
    return layout.read(side._kv_caches[name], block, torch.full_like(positions, g), positions % BS)


def _region_matches_positional(side, region) -> None:
    """Every compact entry holds the K/V of its position (read from the positional blocks)."""
    for layer in range(LAYERS):
        name = f"model.layers.{layer}.self_attn.attn"
        layout = side._layouts[name]
        keys, values = layout.read(side._kv_caches[name], region.block[layer], region.plane[layer], region.slot[layer])
        lens = region.lens[layer].tolist()
        for g, (k, v, p) in enumerate(zip(torch.split(keys, lens), torch.split(values, lens),
                                          region.head_positions(layer))):
            want_k, want_v = _positional(side, layer, g, p)
            assert torch.equal(k, want_k) and torch.equal(v, want_v), (layer, g)


def test_positional_then_region_plus_tail_recompactions_copy_every_kept_entry():
    side = _side(_caches())
    _receive(side, {"r": Admission(CFG, PROMPT, 1)})
    side.plan([_row("r", 0, PROMPT, blocks=TABLE)], MODEL)
    side.finish()
    state = side.table.get("r")
    assert state.status == PAGE and state.decode is not None
    k1 = compact_blocks_needed(CFG, 80, BS, LAYERS, HKV)
    first = list(range(30, 30 + k1))
    done = _decode_until(side, PROMPT, 80, first)
    assert not done.decode_failed and state.status == HEAD
    region = state.region
    assert (region.tail_start, region.first_tail_block) == (80, 2)
    record = side.recorder.decode["r"][0]
    policy = build_policy(CFG, BS)
    assert all(torch.equal(h, torch.arange(80)) for row in record["held"] for h in row)
    replanned = plan_held(policy, record["scores"], 80, record["held"])
    assert all(torch.equal(a, b) for ra, rb in zip(record["kept"], replanned.indices) for a, b in zip(ra, rb))
    assert region.lens.tolist() == [[k.numel() for k in row] for row in record["kept"]]
    assert int(region.lens.sum()) == LAYERS * HKV * 40  # adakv over single tokens: Hkv * B per layer
    _region_matches_positional(side, region)
    report = side.take_report()
    assert report.decode_compacted == {"r": region.lens.flatten().tolist()} and report.decode_count == {"r": 1}
    assert not report.head_failed

    # the next one reads the compact region (positions < 80) and the tail (80 .. 95)
    k2 = compact_blocks_needed(CFG, 96, BS, LAYERS, HKV)
    second = list(range(40, 40 + k2))
    done = _decode_until(side, 80, 96, second)
    assert not done.decode_failed and state.region is not region
    record = side.recorder.decode["r"][1]
    for layer in range(LAYERS):
        for g, held in enumerate(record["held"][layer]):
            assert torch.equal(held, torch.cat([region.head_positions(layer)[g], torch.arange(80, 96)]))
    assert (state.region.tail_start, state.region.first_tail_block) == (96, 3)
    assert set(state.region.block[0].tolist()) <= set(second)
    _region_matches_positional(side, state.region)  # copied from the old region and the tail


def test_a_failed_recompaction_gives_the_blocks_back_and_keeps_what_is_held():
    side = _side(_caches())
    _receive(side, {"r": Admission(CFG, PROMPT, 1)})
    side.plan([_row("r", 0, PROMPT, blocks=TABLE)], MODEL)
    side.finish()
    done = _decode_until(side, PROMPT, 80, [30, 31, 32], forward_last=False)  # no scores
    assert done.decode_failed == {"r": ("snapkv", "head", "scoring")}
    state = side.table.get("r")
    assert state.status == PAGE and state.region is None and state.decode_from == 80
    report = side.take_report()
    assert report.head_failed == {"r"} and not report.decode_compacted and not report.decode_count


def test_an_order_for_a_row_not_scored_is_given_back():
    side = _side(_caches())
    _receive(side, {"r": Admission(CFG, PROMPT, 1)})
    side.plan([_row("r", 0, PROMPT, blocks=TABLE)], MODEL)
    side.finish()
    _receive(side, orders={"r": [30, 31]})  # the window holds one query: not scored
    side.plan([_row("r", PROMPT, 1, blocks=TABLE)], MODEL)
    assert not side.current_step().decode[0].score
    _forward(side, 1)
    side.finish()
    assert side.take_report().head_failed == {"r"}


def test_the_scheduler_orders_every_interval_with_the_bound_of_the_whole_length():
    flat = {"kv_eviction": "snapkv", "kv_budget": 160, "kv_window": 16, "kv_decode_interval": 64}
    cfg = EvictionConfig.from_flat(flat)
    r = Recompactions()
    r.admit("a", cfg, 300)
    assert r.due("a", cfg, 364, 32, 2, 2) is None  # its prompt is not compacted yet
    r.compacted("a", 160.0, 300)
    assert r.due("a", cfg, 363, 32, 2, 2) is None
    k = r.due("a", cfg, 364, 32, 2, 2)
    assert k == compact_blocks_needed(cfg, 364, 32, 2, 2) == 5  # whole pages per head: ceil(160 / 32)
    r.ordered("a", 364)
    assert r.due("a", cfg, 365, 32, 2, 2) is None and r.due("a", cfg, 428, 32, 2, 2) == 5
    assert r.installed("a", [160] * 4) == 64  # held 160 + 64 per head, kept 160
    off = EvictionConfig.from_flat({**flat, "kv_prompt_eviction": "off"})
    r.admit("b", off, 300)  # the prompt whole: due from the start
    assert r.due("b", off, 364, 32, 2, 2) == 5
    over = EvictionConfig.from_flat({**flat, "kv_budget": 320})
    r.admit("c", over, 300)  # a cap over the prompt: scored, left whole by the scheduler
    assert r.due("c", over, 364, 32, 2, 2) is None
    r.kept_whole("c")  # positional from now on: due at the first interval
    assert r.due("c", over, 364, 32, 2, 2) == compact_blocks_needed(over, 364, 32, 2, 2) == 10
    r.forget(["a", "b", "c"])
    assert r.due("a", cfg, 1000, 32, 2, 2) is None


@pytest.mark.parametrize("selection", ["page", "token"])
def test_reference_loop_keeps_each_head_bounded_and_forced_to_keep_all_equals_the_full_cache(tiny_engine, selection,
                                                                                             one_torch_thread):
    from vllm_kvevict.vllm.inprocess import random_prompt

    prefilled = tiny_engine.prefill(torch.tensor(random_prompt(100, seed=3)))
    cfg = EvictionConfig.from_flat({"kv_eviction": "snapkv", "kv_budget": 48, "kv_window": 8,
                                    "kv_decode_interval": 16, "kv_head_selection": selection})
    out = tiny_engine.generate(prefilled, cfg, 70, stop_on_eos=False, block_size=16, return_cache=True)
    assert [e.seq_len for e in out.decode_evictions] == [116, 132, 148, 164]
    for e in out.decode_evictions:
        for kept_row, held_row in zip(e.kept, e.held):
            assert all(bool(torch.isin(k, h).all()) for k, h in zip(kept_row, held_row))
            assert sum(k.numel() for k in kept_row) < sum(h.numel() for h in held_row)
    assert int(out.cache.lengths().max()) <= 48 + 16 + 16 + 6  # after the last eviction: budget (+ a page) + 6 run
    everything = tiny_engine.generate(prefilled, cfg, 70, stop_on_eos=False, block_size=16,
                                      kept=[[torch.arange(100)] * 2] * 2, decode_choices=lambda _i, e: e.held)
    full = tiny_engine.generate(prefilled, EvictionConfig(), 70, stop_on_eos=False)
    assert everything.token_ids == full.token_ids
