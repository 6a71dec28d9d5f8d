"""Decode-time eviction at head granularity in real vLLM == the reference engine (tiny Llama).

One engine serves one request per policy in the same batch; each generates 260 tokens and is
recompacted every ``decode_interval`` of them (four to six times; a prompt under a cap over its
length is left whole and recompacted from the first interval): each (layer, KV head)'s held
tokens (its compact region, then the positional tail) are scored head by head, planned
(whole pages per head, or single tokens) and copied into ``K'`` fresh blocks; the old compact
blocks and the consumed tail blocks go back to vLLM's pool. For every recompaction the served
held sets equal the reference engine's (HF transformers, forced to the served kept sets), the
served scores equal its scores to rounding, the served kept sets are exactly the plan of the
served scores, and the greedy outputs are equal token for token (why forced: tests/kept_sets.py).
Blocks really go back (held blocks bounded, nothing leaks on finish, abort or preemption) and
the ``kvevict_`` decode counters count them.
"""

from __future__ import annotations

import math

import pytest
import torch

from vllm_kvevict.cache import compact_blocks_needed
from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.vllm.inprocess import (
    block_pool,
    held_blocks,
    open_llm,
    random_prompt,
    record_evictions,
    recorded_key,
    run_until_done,
    scheduler,
)

pytestmark = pytest.mark.slow

BLOCK, PROMPT_LEN, MAX_TOKENS, LAYERS, KV_HEADS = 32, 300, 260, 2, 2
#: name -> the request's ``vllm_xargs``: whole pages per head (adakv, snapkv's default) and single
#: tokens per head under a token cap; decode only (the prompt whole until the first
#: recompaction) with a fraction and no floor, so that the budget follows the length; uniform
#: whole pages with sinks.
POLICIES = {
    "snapkv_pages_cap": {"kv_eviction": "snapkv", "kv_budget": 160, "kv_window": 16, "kv_decode_interval": 64},
    "snapkv_tokens_cap": {"kv_eviction": "snapkv", "kv_budget": 160, "kv_window": 16, "kv_decode_interval": 64,
                          "kv_head_selection": "token"},
    "knorm_fraction_decode_only": {"kv_eviction": "knorm", "kv_budget": 0.3, "kv_decode_interval": 48,
                                   "kv_prompt_eviction": "off", "kv_min_tokens": 0},
    "streamingllm_uniform_cap": {"kv_eviction": "streamingllm", "kv_budget": 128, "kv_window": 8,
                                 "kv_decode_interval": 40, "kv_granularity": "head"},
    # TriAttention's setting: a cap over the prompt, so the prompt's own eviction gains nothing
    # and leaves it whole; the first interval recompacts it.
    "snapkv_cap_over_prompt": {"kv_eviction": "snapkv", "kv_budget": 320, "kv_window": 16, "kv_decode_interval": 64},
    # the main job's scorer: whole pages per head (32-token blocks), value norms from each KV
    # head's group of o_proj
    "criticalkv_pages_cap": {"kv_eviction": "criticalkv", "kv_budget": 160, "kv_window": 16, "kv_decode_interval": 64},
}


def config_of(name: str) -> EvictionConfig:
    return EvictionConfig.from_flat(POLICIES[name])


def prompt_compacted(config: EvictionConfig) -> bool:
    """The prompt's own eviction compacts it (else it stays whole until the first interval)."""
    return config.evicts_prompt and config.budget_tokens(PROMPT_LEN) < PROMPT_LEN


def _greedy(max_tokens: int, extra: dict):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, extra_args=extra)


def _history(recorded: dict, request_id: str):
    key = recorded_key(recorded, request_id)
    return recorded[key] if key is not None else None


def _held_scores_close(served, reference, held, what: str) -> None:
    """The same positions held (``-inf`` elsewhere) and the held scores within rounding."""
    from kept_sets import assert_scores_close

    from vllm_kvevict.policies import LayerScores

    def on_held(scores, layer):
        mask = torch.zeros_like(scores.protected)
        for g, pos in enumerate(held[layer]):
            mask[g, pos] = True
        assert torch.equal(torch.isfinite(scores.values), mask), f"{what} layer {layer}: held positions differ"
        return LayerScores(torch.where(mask, scores.values, torch.zeros_like(scores.values)), scores.protected)

    assert_scores_close([on_held(s, i) for i, s in enumerate(served)], [on_held(r, i) for i, r in enumerate(reference)],
                        what)


@pytest.fixture(scope="module")
def prompt():
    return random_prompt(PROMPT_LEN, seed=7)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    with open_llm(
        str(tiny_llama_dir),
        max_model_len=1024,
        max_num_batched_tokens=256,
        max_num_seqs=len(POLICIES),
        additional_config={"kv_eviction": {"scorer": "snapkv", "budget": 0.5}},
    ) as llm:
        record_evictions(llm)
        yield llm


@pytest.fixture(scope="module")
def served(llm, prompt):
    from vllm_kvevict.vllm.backends import cpu_head_pages
    from vllm_kvevict.vllm.inprocess import collected_stats

    recorder = record_evictions(llm)
    pool = block_pool(llm)
    free0 = pool.get_num_free_blocks()

    op_rows, attend = [], cpu_head_pages.attend_head_pages

    def recording(batch, *args):  # which rows vLLM's own op attended, at which recompaction
        op_rows.extend((row.req_id, row.region.tail_start) for row in batch.head_rows)
        return attend(batch, *args)

    with pytest.MonkeyPatch.context() as mp, collected_stats(llm) as total:
        mp.setattr(cpu_head_pages, "attend_head_pages", recording)
        outs = llm.generate([{"prompt_token_ids": prompt}] * len(POLICIES),
                            [_greedy(MAX_TOKENS, x) for x in POLICIES.values()], use_tqdm=False)
    assert not recorder.failures, recorder.failures
    result = {}
    for name, out in zip(POLICIES, outs):
        result[name] = {"tokens": list(out.outputs[0].token_ids), "prompt_kept": _history(recorder.kept, out.request_id),
                        "decode": _history(recorder.decode, out.request_id),
                        "op_tail_starts": {t for r, t in op_rows if r == out.request_id or r.startswith(f"{out.request_id}-")}}
    return result, free0, pool.get_num_free_blocks(), total


@pytest.fixture(scope="module")
def reference(tiny_engine, prompt, served, one_torch_thread):
    """The reference engine's generation per policy, forced to the served kept sets."""
    result = {}
    prefilled = tiny_engine.prefill(torch.tensor(prompt))
    for name in POLICIES:
        got = served[0][name]
        decode = got["decode"]
        result[name] = tiny_engine.generate(prefilled, config_of(name), MAX_TOKENS, stop_on_eos=False,
                                            kept=got["prompt_kept"], block_size=BLOCK,
                                            decode_choices=lambda i, _e, d=decode: d[i]["kept"])
    return result


@pytest.mark.parametrize("name", list(POLICIES))
def test_every_interval_recompacts(name, served):
    config, got = config_of(name), served[0][name]
    assert (got["prompt_kept"] is not None) == prompt_compacted(config)
    decode = got["decode"]
    want = [PROMPT_LEN + k * config.decode_interval for k in range(1, (MAX_TOKENS - 1) // config.decode_interval + 1)]
    assert [e["seq_len"] for e in decode] == want
    assert len(decode) >= 4, len(decode)
    evicting = []
    for e in decode:  # each head keeps only what it held; a layer keeps fewer (or, at a fraction, all)
        kept = torch.tensor([[k.numel() for k in row] for row in e["kept"]])
        held = torch.tensor([[h.numel() for h in row] for row in e["held"]])
        assert bool((kept.sum(1) <= held.sum(1)).all()), (name, e["seq_len"])
        evicting.append(bool((kept.sum(1) < held.sum(1)).all()))
        assert all(bool(torch.isin(k, h).all()) for kr, hr in zip(e["kept"], e["held"]) for k, h in zip(kr, hr))
    # a cap evicts every time; a fraction of a growing length may find nothing to evict
    assert all(evicting) if config.is_token_budget else sum(evicting) >= 2, evicting


@pytest.mark.parametrize("name", list(POLICIES))
def test_held_sets_and_scores_match_reference_and_kept_is_their_plan(name, served, reference):
    from kept_sets import differing_heads

    from vllm_kvevict.policies import build_policy
    from vllm_kvevict.policies.held import plan_held

    config, decode = config_of(name), served[0][name]["decode"]
    ref = reference[name].decode_evictions
    assert len(ref) == len(decode)
    policy = build_policy(config, BLOCK)
    for i, (s, r) in enumerate(zip(decode, ref)):
        what = f"{name} recompaction {i}"
        assert s["seq_len"] == r.seq_len, what
        assert differing_heads(s["held"], r.held) == 0, what
        _held_scores_close(s["scores"], r.scores, s["held"], what)
        replanned = plan_held(policy, s["scores"], s["seq_len"], s["held"])
        assert differing_heads(s["kept"], replanned.indices) == 0, what


def test_whole_page_regions_decode_through_vllms_op_after_every_recompaction(served):
    """Whole pages per head stay whole after a recompaction (the prompt's partial last page is the
    tail's first block, 300 % 32 == 364 % 32), so every recompacted region decodes through vLLM's
    own attention op (backends/cpu_head_pages), as the prompt's region did; single tokens per head
    keep the torch path."""
    got = served[0]["snapkv_pages_cap"]
    assert got["op_tail_starts"] == {PROMPT_LEN} | {e["seq_len"] for e in got["decode"]}
    assert served[0]["snapkv_tokens_cap"]["op_tail_starts"] == set()


@pytest.mark.parametrize("name", list(POLICIES))
def test_greedy_output_equals_reference(name, served, reference):
    assert served[0][name]["tokens"] == reference[name].token_ids


def test_budget_semantics_cap_is_flat_fraction_follows_length(served):
    """After every recompaction each layer keeps its heads' budget: a token cap keeps ``Hkv * B``
    (single tokens) or the whole pages of ``ceil(B / bs)`` runs per head (so within a block of
    ``B`` per head); a fraction keeps ``int(f * seq_len)`` of the length so far."""
    for name in POLICIES:
        config = config_of(name)
        for e in served[0][name]["decode"]:
            budget = config.budget_tokens(e["seq_len"])
            assert budget == (int(config.budget) if config.is_token_budget else int(config.budget * e["seq_len"]))
            for row in e["kept"]:
                mean = sum(k.numel() for k in row) / len(row)
                if config.head_selection_for(BLOCK) == "token":
                    assert mean == budget, (name, e["seq_len"], mean)
                else:
                    assert budget - BLOCK < mean <= math.ceil(budget / BLOCK) * BLOCK, (name, e["seq_len"], mean)


def _returned(name: str, decode: list[dict]) -> list[int]:
    """Blocks each recompaction gave back: the old compact blocks and the consumed tail blocks,
    less the ``K'`` it took."""
    config = config_of(name)
    if prompt_compacted(config):
        compact, first_tail = compact_blocks_needed(config, PROMPT_LEN, BLOCK, LAYERS, KV_HEADS), PROMPT_LEN // BLOCK
    else:
        compact, first_tail = 0, 0
    out = []
    for e in decode:
        out.append(max(0, compact + e["seq_len"] // BLOCK - first_tail - len(e["blocks"])))
        compact, first_tail = len(e["blocks"]), e["seq_len"] // BLOCK
    return out


def test_blocks_return_to_the_pool_and_are_counted(served):
    result, free0, free_after, stats = served
    assert free_after == free0
    reduced = stats.reduce()
    assert reduced["kvevict decode evictions"] == sum(len(r["decode"]) for r in result.values())
    returned = sum(sum(_returned(name, r["decode"])) for name, r in result.items())
    assert returned > 0
    assert reduced["kvevict decode blocks returned"] == returned
    assert {tuple(d[:2]) for d in stats.data["decode"]} == {(config_of(n).scorer, "head") for n in POLICIES}
    assert ["knorm", "head", "decode_only"] in stats.data["outcomes"]  # its prompt was kept whole
    for name, r in result.items():
        config = config_of(name)
        for e in r["decode"]:
            assert len(e["blocks"]) == compact_blocks_needed(config, e["seq_len"], BLOCK, LAYERS, KV_HEADS)


@pytest.mark.parametrize("name", ["snapkv_pages_cap", "snapkv_cap_over_prompt"])
def test_held_blocks_stay_bounded_and_abort_frees_all(name, llm, prompt):
    engine, pool = llm.llm_engine, block_pool(llm)
    free0 = pool.get_num_free_blocks()
    extra = POLICIES[name]
    req_id = engine.add_request(f"abort-decode-head-{name}", {"prompt_token_ids": prompt}, _greedy(600, extra))
    most = 0
    while True:
        engine.step()
        req = scheduler(llm).requests.get(req_id)
        if req.num_output_tokens > 2:
            most = max(most, held_blocks(llm, req_id))
        if req.num_output_tokens >= 300:
            break
    cap = math.ceil(extra["kv_budget"] / BLOCK) + math.ceil(64 / BLOCK) + 2  # K' + the tail of one interval
    assert most <= cap, most
    engine.abort_request([req_id])
    while engine.has_unfinished_requests():
        engine.step()
    assert pool.get_num_free_blocks() == free0


def test_prefix_cache_hit_gives_the_same_recompactions_and_output(llm, prompt, served):
    """The prompt is in the prefix cache now (the batch above); a warm request keeps the same
    tokens per head at every recompaction and writes the same tokens (no block filled after a
    compaction was cached: the request is frozen)."""
    recorder = record_evictions(llm)
    out = llm.generate([{"prompt_token_ids": prompt}], _greedy(MAX_TOKENS, POLICIES["snapkv_pages_cap"]),
                       use_tqdm=False)[0]
    assert out.num_cached_tokens > 0, "no prefix-cache hit: this checks nothing"
    cold = served[0]["snapkv_pages_cap"]
    warm = _history(recorder.decode, out.request_id)
    assert len(warm) == len(cold["decode"])
    for w, c in zip(warm, cold["decode"]):
        assert all(torch.equal(a, b) for ra, rb in zip(w["kept"], c["kept"]) for a, b in zip(ra, rb)), w["seq_len"]
    assert list(out.outputs[0].token_ids) == cold["tokens"]


def test_preempted_request_recompacts_again_and_frees_everything(tiny_llama_dir):
    """(Last: its own engine replaces the module's.) A request recompacting during decode is preempted by two larger high-priority requests:
    it re-prefills, compacts its prompt and recompacts again during decode, finishes; no block
    leaks."""
    block_bytes = 2 * 2 * KV_HEADS * 32 * BLOCK * 4  # layers x (K, V) x KV heads x head dim x block x float32
    with open_llm(
        str(tiny_llama_dir),
        max_model_len=3000,
        max_num_batched_tokens=1024,
        kv_cache_memory_bytes=100 * block_bytes,
        scheduling_policy="priority",
        additional_config={"kv_eviction": {"scorer": "snapkv", "budget": 0.5}},
    ) as engine_llm:
        recorder = record_evictions(engine_llm)
        engine, pool = engine_llm.llm_engine, block_pool(engine_llm)
        free0 = pool.get_num_free_blocks()
        victim = engine.add_request("victim", {"prompt_token_ids": random_prompt(900, seed=31)},
                                    _greedy(400, POLICIES["snapkv_pages_cap"]), priority=10)
        while not recorder.decode.get(victim):
            engine.step()
        hog = _greedy(160, {"kv_eviction": "none"})
        for i in range(2):
            engine.add_request(f"hog{i}", {"prompt_token_ids": random_prompt(1400, seed=40 + i)}, hog, priority=0)
        preemptions, finished = run_until_done(engine_llm, victim)
        assert preemptions >= 1, "the scenario did not preempt the recompacting request"
        assert not recorder.failures, recorder.failures
        assert recorder.decode[victim][-1]["seq_len"] > 900 + 200, "no recompaction after the re-prefill"
        assert sorted(finished.values()) == [160, 160, 400]
        assert pool.get_num_free_blocks() == free0
