"""Head granularity inside real vLLM (CPU): per-(layer, KV head) scores equal the reference
engine's (to rounding), kept sets are the shared selection of those scores, greedy outputs equal
the reference engine's compacted generation over the same kept sets, the request holds its K
compact blocks + its tail (read from vLLM's pool), and nothing leaks on finish or abort, before
or after compaction. Why not bit-equal kept sets: tests/kept_sets.py.

Tiny random GQA Llama for exactness (float32); SmolLM2 for the kept sets on a real model.
"""

from __future__ import annotations

import math

import pytest
import torch

from vllm_kvevict.cache import compact_blocks_needed
from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.vllm.inprocess import block_pool, held_blocks, open_llm, random_prompt, recorded_key, scheduler

pytestmark = pytest.mark.slow

BLOCK, BUDGET, PROMPT_LEN, NEW_TOKENS = 32, 0.25, 700, 8
#: lkv's scorer and allocation (whole pages per head, and single tokens), and lkv's allocation under
#: snapkv: on the tiny Llama they read a random artifact made for it (``tiny_lkv_artifact``), on
#: SmolLM2 the packaged one, found by default.
LKV_POLICIES = {
    "lkv-lkv": {"kv_eviction": "lkv"},
    "lkv-lkv-tokens": {"kv_eviction": "lkv", "kv_head_selection": "token"},
    "snapkv-lkv": {"kv_eviction": "snapkv", "kv_allocation": "lkv"},
}
#: A floor of 256 tokens above the budget's int(700 * 0.25) = 175: the plugin's K, kept sets and
#: outputs must follow the floor exactly as the reference does (whole pages and single tokens per
#: head, CriticalKV's uniform stage 1, the pyramid schedule).
FLOOR = 256
FLOOR_POLICIES = {
    "snapkv-adakv-floor": {"kv_eviction": "snapkv", "kv_min_tokens": FLOOR},
    "snapkv-adakv-tokens-floor": {"kv_eviction": "snapkv", "kv_head_selection": "token", "kv_min_tokens": FLOOR},
    "criticalkv-uniform-floor": {"kv_eviction": "criticalkv", "kv_allocation": "uniform", "kv_granularity": "head",
                                 "kv_min_tokens": FLOOR},
    "pyramidkv-pyramid-floor": {"kv_eviction": "pyramidkv", "kv_min_tokens": FLOOR},
}
#: adakv (snapkv's default), criticalkv, defensivekv, snapkv with uniform allocation (whole pages
#: per head, the default for these), adakv selecting single tokens, the allocations across
#: layers (single tokens), and the lkv policies.
POLICIES = {
    "snapkv-adakv": {"kv_eviction": "snapkv"},
    "snapkv-adakv-tokens": {"kv_eviction": "snapkv", "kv_head_selection": "token"},
    "criticalkv-adakv": {"kv_eviction": "criticalkv"},
    "defensivekv-adakv": {"kv_eviction": "defensivekv"},
    "snapkv-uniform": {"kv_eviction": "snapkv", "kv_allocation": "uniform", "kv_granularity": "head"},
    # allocations across layers, capped per layer so that K stays a function of the budget
    "laprox-global": {"kv_eviction": "laprox"},
    "pyramidkv-pyramid": {"kv_eviction": "pyramidkv"},
    **LKV_POLICIES,
    **FLOOR_POLICIES,
}


def flat_policy(name: str, artifact=None) -> dict:
    """``POLICIES[name]``, reading ``artifact`` if it is an lkv policy and one is given."""
    extra = {"kv_lkv_artifact": str(artifact)} if artifact is not None and name in LKV_POLICIES else {}
    return {**POLICIES[name], **extra}


def _greedy(max_tokens: int, **extra):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, extra_args=extra or None)


def _serve(model_dir, prompt, policies, **engine_kwargs):
    """Every policy's request in one batch (prefill in 256-token chunks); ``{name: (tokens, KeptSet)}``."""
    from vllm_kvevict.vllm.inprocess import record_evictions

    with open_llm(
        str(model_dir),
        max_num_batched_tokens=256,
        max_num_seqs=len(policies),
        additional_config={"kv_eviction": {"scorer": "snapkv", "budget": BUDGET}},
        **engine_kwargs,
    ) as llm:
        recorder = record_evictions(llm)
        free0 = block_pool(llm).get_num_free_blocks()
        params = [_greedy(NEW_TOKENS, **p) for p in policies.values()]
        outs = llm.generate([{"prompt_token_ids": prompt}] * len(policies), params, use_tqdm=False)
        assert not recorder.failures
        assert block_pool(llm).get_num_free_blocks() == free0
        kept = recorder.kept
    result = {}
    for name, out in zip(policies, outs):
        key = recorded_key(kept, out.request_id)
        assert key is not None, f"{name}: the request was not compacted"
        result[name] = (list(out.outputs[0].token_ids), kept[key])
    return result


def _reference(model_dir, prompt):
    from vllm_kvevict.reference.engine import ReferenceEngine

    engine = ReferenceEngine(str(model_dir))
    return engine, engine.prefill(torch.tensor(prompt))


def _config(name: str, artifact=None) -> EvictionConfig:
    return EvictionConfig.from_flat({**flat_policy(name, artifact), "kv_budget": BUDGET, "kv_granularity": "head"})


def check_against_reference(name: str, kept, engine, prefilled, artifact=None) -> None:
    """Served scores == the reference's (to rounding); served kept set == the shared selection of
    the served scores (exact); see tests/kept_sets.py."""
    from kept_sets import assert_scores_close, differing_heads

    from vllm_kvevict.policies import build_policy

    config = _config(name, artifact)
    policy = build_policy(config, BLOCK, model=prefilled.model)
    reference = [policy.score_layer(layer) for layer in prefilled.layer_inputs(config)]
    assert_scores_close(kept.scores, reference, name)
    replanned = policy.plan_head(kept.scores, prefilled.prompt_len)
    assert differing_heads(kept.indices, replanned.indices) == 0, name


def reference_generation(name: str, kept, engine, prefilled, artifact=None) -> list[int]:
    """The reference engine's greedy tokens over the served kept set."""
    return list(engine.generate(prefilled, _config(name, artifact), NEW_TOKENS, stop_on_eos=False, kept=kept,
                                block_size=BLOCK).token_ids)


@pytest.fixture(scope="module")
def tiny_served(tiny_llama_dir, tiny_lkv_artifact):
    policies = {name: flat_policy(name, tiny_lkv_artifact) for name in POLICIES}
    return _serve(tiny_llama_dir, random_prompt(PROMPT_LEN, seed=5), policies, max_model_len=2048,
                  enable_prefix_caching=False)


@pytest.fixture(scope="module")
def tiny_reference(tiny_llama_dir):
    return _reference(tiny_llama_dir, random_prompt(PROMPT_LEN, seed=5))


@pytest.mark.parametrize("name", list(POLICIES))
def test_kept_sets_equal_reference(name, tiny_served, tiny_reference, tiny_lkv_artifact):
    check_against_reference(name, tiny_served[name][1], *tiny_reference, artifact=tiny_lkv_artifact)


@pytest.mark.parametrize("name", list(POLICIES))
def test_greedy_output_equals_reference_compacted_generation(name, tiny_served, tiny_reference, tiny_lkv_artifact):
    tokens, kept = tiny_served[name]
    assert tokens == reference_generation(name, kept, *tiny_reference, artifact=tiny_lkv_artifact)


@pytest.mark.parametrize("name", list(FLOOR_POLICIES))
def test_the_floor_binds_in_the_served_kept_sets(name, tiny_served):
    """The floored policies keep 256 tokens per head on average (175 without the floor): exactly
    with single tokens per head, 8 pages per head (the prompt's last page holds 28 tokens) with
    whole pages (snapkv and criticalkv here)."""
    kept, config = tiny_served[name][1], _config(name)
    assert config.budget_tokens(PROMPT_LEN) == FLOOR > int(PROMPT_LEN * BUDGET)
    mean = float(kept.head_budgets.float().mean())
    if config.head_selection_for(BLOCK) == "page":
        assert FLOOR - BLOCK < mean <= FLOOR, (name, mean)
    else:
        assert mean == FLOOR, (name, mean)


@pytest.fixture(scope="module")
def head_llm(tiny_llama_dir, tiny_served):  # tiny_served first: one engine alive at a time
    with open_llm(
        str(tiny_llama_dir),
        max_model_len=4096,
        max_num_batched_tokens=1024,
        additional_config={"kv_eviction": {"scorer": "criticalkv", "budget": 0.1}},
    ) as llm:
        yield llm


def _state(llm):
    from vllm_kvevict.vllm.scheduler.state import state_of

    return state_of(scheduler(llm).kv_cache_manager)


def test_request_holds_its_compact_blocks_and_tail_then_frees_all(head_llm):
    prompt_len, max_tokens = 2060, 40
    engine, pool, state = head_llm.llm_engine, block_pool(head_llm), _state(head_llm)
    hf = head_llm.llm_engine.model_config.hf_config
    config = EvictionConfig(scorer="criticalkv", budget=0.1)
    assert (config.resolved_allocation, config.resolved_granularity) == ("adakv", "head")
    k = compact_blocks_needed(config, prompt_len, BLOCK, hf.num_hidden_layers, hf.num_key_value_heads)
    free0, returned0 = pool.get_num_free_blocks(), state.blocks_returned
    req_id = engine.add_request("held", {"prompt_token_ids": random_prompt(prompt_len, seed=1)}, _greedy(max_tokens))
    checked = 0
    while engine.has_unfinished_requests():
        engine.step()
        req = scheduler(head_llm).requests.get(req_id)
        if req is None or state.blocks_returned == returned0:
            continue
        tail = math.ceil(req.num_tokens / BLOCK) - prompt_len // BLOCK
        held = free0 - pool.get_num_free_blocks()
        assert held == held_blocks(head_llm, req_id) <= k + tail, (held, k, tail)
        assert held >= k + tail - 1  # the newest token's block is allocated a step ahead
        checked += 1
    assert checked > 0, "the request was never compacted"
    assert state.blocks_returned - returned0 == prompt_len // BLOCK - k
    assert pool.get_num_free_blocks() == free0


@pytest.mark.parametrize("when", ["prefilling", "compacted"])
def test_abort_before_or_after_compaction_frees_everything(head_llm, when):
    engine, pool, state = head_llm.llm_engine, block_pool(head_llm), _state(head_llm)
    free0, returned0 = pool.get_num_free_blocks(), state.blocks_returned
    req_id = engine.add_request(f"abort-{when}", {"prompt_token_ids": random_prompt(2060, seed=3)}, _greedy(100))
    for _ in range(50):
        engine.step()
        req = scheduler(head_llm).requests.get(req_id)
        if when == "prefilling" and req is not None and 0 < req.num_computed_tokens < 2060:
            break
        if when == "compacted" and state.blocks_returned > returned0:
            break
    else:
        pytest.fail(f"never reached {when}")
    engine.abort_request([req_id])
    while engine.has_unfinished_requests():
        engine.step()
    assert not state.pending_compactions
    assert pool.get_num_free_blocks() == free0


def test_request_finishing_in_its_scoring_step_gives_its_compact_blocks_back(head_llm):
    """max_tokens=1: the request finishes in the step that compacts it, before the swap."""
    engine, pool, state = head_llm.llm_engine, block_pool(head_llm), _state(head_llm)
    free0, returned0 = pool.get_num_free_blocks(), state.blocks_returned
    engine.add_request("one-token", {"prompt_token_ids": random_prompt(2060, seed=4)}, _greedy(1))
    while engine.has_unfinished_requests():
        engine.step()
    assert not state.pending_compactions and state.blocks_returned == returned0
    assert pool.get_num_free_blocks() == free0

