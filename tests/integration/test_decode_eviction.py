"""Decode-time eviction (page granularity) in real vLLM == the reference engine (tiny Llama).

One engine serves one request per policy in the same batch; each generates 260 tokens and is
evicted again every ``decode_interval`` of them (four to six times; h2o with the attention sums
it accumulates during decode). For every decode-time
eviction the served plugin's scores of the held tokens equal the reference engine's (HF
transformers, same held tokens) to rounding, the served evicted blocks are exactly the page
selection of the served scores under the budget of the request's whole length, and the greedy
outputs are equal token for token when the reference evicts what the plugin evicted (why the
choice is forced rather than compared bit for bit: tests/kept_sets.py). Blocks really go back
to vLLM's pool (held blocks stay bounded, nothing leaks on finish or abort) and the
``kvevict_`` decode counters count them.
"""

from __future__ import annotations

import math

import pytest
import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.vllm.inprocess import (
    block_pool,
    held_blocks,
    open_llm,
    random_prompt,
    record_evictions,
    recorded_key,
    scheduler,
)

pytestmark = pytest.mark.slow

BLOCK, PROMPT_LEN, MAX_TOKENS = 32, 300, 260
#: name -> the request's ``vllm_xargs`` (prompt and decode, decode only, token caps, o_proj
#: (value_aware, criticalkv's value norms), the last query alone (tova); the
#: knorm fraction under the default floor of 192 tokens, which binds below 640 tokens, the
#: value_aware one without a floor, so that its budget follows the length).
POLICIES = {
    "snapkv_cap": {"kv_eviction": "snapkv", "kv_budget": 160, "kv_window": 16, "kv_decode_interval": 64},
    "knorm_fraction_decode_only": {"kv_eviction": "knorm", "kv_budget": 0.3, "kv_decode_interval": 48,
                                   "kv_prompt_eviction": "off"},
    "streamingllm_cap": {"kv_eviction": "streamingllm", "kv_budget": 128, "kv_window": 8, "kv_decode_interval": 40},
    "value_aware_fraction": {"kv_eviction": "value_aware", "kv_budget": 0.25, "kv_window": 16,
                             "kv_decode_interval": 64, "kv_min_tokens": 0},
    "criticalkv_cap": {"kv_eviction": "criticalkv", "kv_budget": 160, "kv_window": 16, "kv_decode_interval": 64},
    "tova_cap": {"kv_eviction": "tova", "kv_budget": 128, "kv_decode_interval": 40},
    # h2o: attention sums of every query run (prompt, then each decode step), pruned at each eviction
    "h2o_cap": {"kv_eviction": "h2o", "kv_budget": 160, "kv_window": 16, "kv_decode_interval": 48},
    "h2o_cap_decode_only": {"kv_eviction": "h2o", "kv_budget": 128, "kv_window": 8, "kv_decode_interval": 40,
                            "kv_prompt_eviction": "off"},
    # its recent half is a share of the whole length, not of the held tokens
    "h2o_fraction": {"kv_eviction": "h2o", "kv_budget": 0.3, "kv_window": 8, "kv_decode_interval": 48,
                     "kv_min_tokens": 0},
}


def config_of(name: str) -> EvictionConfig:
    return EvictionConfig.from_flat({**POLICIES[name], "kv_granularity": "page"})


def _greedy(max_tokens: int, extra: dict):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                          extra_args={**extra, "kv_granularity": "page"})


def _history(recorded: dict, request_id: str):
    key = recorded_key(recorded, request_id)
    return recorded[key] if key is not None else None


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
        additional_config={"kv_eviction": {"scorer": "snapkv", "budget": 0.5, "granularity": "page"}},
    ) as llm:
        record_evictions(llm)
        yield llm


@pytest.fixture(scope="module")
def served(llm, prompt):
    from vllm_kvevict.vllm.inprocess import collected_stats

    recorder = record_evictions(llm)
    pool = block_pool(llm)
    free0 = pool.get_num_free_blocks()
    params = [_greedy(MAX_TOKENS, x) for x in POLICIES.values()]
    with collected_stats(llm) as total:
        outs = llm.generate([{"prompt_token_ids": prompt}] * len(POLICIES), params, use_tqdm=False)
    assert not recorder.failures, recorder.failures
    result = {}
    for name, out in zip(POLICIES, outs):
        result[name] = {
            "tokens": list(out.outputs[0].token_ids),
            "prompt_evicted": _history(recorder.evicted, out.request_id),
            "decode": _history(recorder.decode, out.request_id),
        }
    return result, free0, pool.get_num_free_blocks(), total


@pytest.fixture(scope="module")
def reference(tiny_engine, prompt, served, one_torch_thread):
    """The reference engine's generation per policy, forced to the served choices."""
    from vllm_kvevict.reference.selection import blocks_to_tokens

    result = {}
    prefilled = tiny_engine.prefill(torch.tensor(prompt))
    for name in POLICIES:
        got = served[0][name]
        config, kept = config_of(name), None
        if config.evicts_prompt:
            evicted = set(got["prompt_evicted"])
            blocks = torch.tensor([b for b in range(math.ceil(PROMPT_LEN / BLOCK)) if b not in evicted])
            tokens = blocks_to_tokens(blocks, BLOCK, PROMPT_LEN)
            kept = [[tokens] * prefilled.num_kv_heads for _ in range(prefilled.num_layers)]
        decode = got["decode"]
        result[name] = tiny_engine.generate(prefilled, config, MAX_TOKENS, stop_on_eos=False, kept=kept,
                                            block_size=BLOCK, decode_choices=lambda i, _e, d=decode: d[i]["evicted"])
    return result


@pytest.mark.parametrize("name", list(POLICIES))
def test_every_interval_evicts_again(name, served):
    config, got = config_of(name), served[0][name]
    assert (got["prompt_evicted"] is not None) == config.evicts_prompt
    decode = got["decode"]
    want = [PROMPT_LEN + k * config.decode_interval for k in range(1, (MAX_TOKENS - 1) // config.decode_interval + 1)]
    assert [e["seq_len"] for e in decode] == want
    assert len(decode) >= 4, len(decode)
    evicting = [bool(e["evicted"]) for e in decode]
    # a cap evicts every time; a fraction of a growing length may find nothing to evict
    assert all(evicting) if config.is_token_budget else sum(evicting) >= 2, evicting


@pytest.mark.parametrize("name", list(POLICIES))
def test_decode_scores_match_reference_and_choice_is_their_selection(name, served, reference):
    from kept_sets import assert_scores_close

    from vllm_kvevict.policies import build_policy

    config, decode = config_of(name), served[0][name]["decode"]
    ref = reference[name].decode_evictions
    assert len(ref) == len(decode)
    policy = build_policy(config, BLOCK)
    for i, (s, r) in enumerate(zip(decode, ref)):
        assert (s["seq_len"], s["held_blocks"]) == (r.seq_len, r.held_blocks), f"{name} eviction {i}"
        assert_scores_close(s["scores"], r.scores, f"{name} eviction {i}")
        held_len = s["scores"][0].values.shape[1]
        chosen = policy.evicted_blocks(s["scores"], held_len, budget=config.budget_tokens(s["seq_len"]))
        assert s["evicted"] == [s["held_blocks"][c] for c in chosen], f"{name} eviction {i}"


@pytest.mark.parametrize("name", list(POLICIES))
def test_greedy_output_equals_reference(name, served, reference):
    assert served[0][name]["tokens"] == reference[name].token_ids


def test_budget_semantics_cap_is_flat_fraction_follows_length(served):
    """After every decode-time eviction the request keeps its budget, to within the partial last
    block, and at most ``ceil(B / bs) + 2`` blocks: a token budget ``B`` is a fixed cap, a
    fraction ``f`` keeps ``int(f * seq_len)`` of the request's length so far (at least its floor,
    ``min_tokens``)."""
    for name in POLICIES:
        config = config_of(name)
        for e in served[0][name]["decode"]:
            kept_blocks = len(e["held_blocks"]) - len(e["evicted"])
            kept_tokens = e["scores"][0].values.shape[1] - len(e["evicted"]) * BLOCK
            budget = config.budget_tokens(e["seq_len"])
            share = min(e["seq_len"], max(int(config.budget * e["seq_len"]), config.min_tokens))
            assert budget == (int(config.budget) if config.is_token_budget else share)
            assert kept_blocks <= math.ceil(budget / BLOCK) + 2, (name, e["seq_len"], kept_blocks)
            assert kept_tokens > budget - BLOCK, (name, e["seq_len"], kept_tokens)


def test_blocks_return_to_the_pool_and_are_counted(served):
    result, free0, free_after, stats = served
    assert free_after == free0
    evictions = sum(len(r["decode"]) for r in result.values())
    blocks = sum(len(e["evicted"]) for r in result.values() for e in r["decode"])
    reduced = stats.reduce()
    assert reduced["kvevict decode evictions"] == evictions
    assert reduced["kvevict decode blocks returned"] == blocks


def test_held_blocks_stay_bounded_and_abort_frees_all(llm, prompt):
    engine, pool = llm.llm_engine, block_pool(llm)
    free0 = pool.get_num_free_blocks()
    extra = POLICIES["snapkv_cap"]
    req_id = engine.add_request("abort-decode", {"prompt_token_ids": prompt}, _greedy(600, extra))
    most = 0
    while True:
        engine.step()
        req = scheduler(llm).requests.get(req_id)
        if req.num_output_tokens > 2:
            most = max(most, held_blocks(llm, req_id))
        if req.num_output_tokens >= 400:
            break
    cap = math.ceil(160 / BLOCK) + 2 + math.ceil(64 / BLOCK) + 1  # after eviction + one interval
    assert most <= cap, most
    engine.abort_request([req_id])
    while engine.has_unfinished_requests():
        engine.step()
    assert pool.get_num_free_blocks() == free0


def test_prefix_cache_hit_gives_the_same_decode_evictions_and_output(llm, prompt, served):
    """The prompt is in the prefix cache now (the batch above); a warm request evicts the same
    blocks at every interval and writes the same tokens (no block filled after an eviction was
    cached: the request is frozen)."""
    recorder = record_evictions(llm)
    out = llm.generate([{"prompt_token_ids": prompt}], _greedy(MAX_TOKENS, POLICIES["snapkv_cap"]), use_tqdm=False)[0]
    assert out.num_cached_tokens > 0, "no prefix-cache hit: this checks nothing"
    cold = served[0]["snapkv_cap"]
    warm = _history(recorder.decode, out.request_id)
    assert [e["evicted"] for e in warm] == [e["evicted"] for e in cold["decode"]]
    assert list(out.outputs[0].token_ids) == cold["tokens"]
