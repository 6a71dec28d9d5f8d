"""Prefix caching is exact for every scorer (issue 17): a request whose prompt hits the prefix
cache gets the same scores, kept sets (or evicted pages) and greedy output as its cold run.

Window scorers recompute their window (the hit stops before it); h2o and expected_attention read
every prompt query, so their requests get no hit at all. Cold and warm runs are compared as the
served plugin is compared with the reference (tests/kept_sets.py): scores equal to rounding, the
kept set exactly the shared selection of the scores, the same greedy tokens.
"""

from __future__ import annotations

import pytest
from kept_sets import assert_scores_close

from vllm_kvevict.config import SCORERS, EvictionConfig
from vllm_kvevict.vllm.inprocess import open_llm, random_prompt, record_evictions, recorded_key

pytestmark = pytest.mark.slow

BLOCK, PROMPT_LEN, BUDGET = 32, 700, 0.25
POLICIES = [s for s in SCORERS if s not in ("none", "lkv")]  # lkv: test_head_granularity, its own artifact


def _key(records: dict, output):
    return recorded_key(records, output.request_id)


@pytest.fixture(scope="module")
def runs(tiny_llama_dir):
    """policy -> (cold, warm), each (tokens, cached tokens, scores, kept indices or evicted)."""
    from vllm import SamplingParams

    out = {}
    with open_llm(str(tiny_llama_dir), max_model_len=2048, max_num_batched_tokens=256, enable_prefix_caching=True,
                  additional_config={"kv_eviction": {"scorer": "snapkv", "budget": BUDGET}}) as llm:
        recorder = record_evictions(llm)
        for i, policy in enumerate(POLICIES):
            prompt = random_prompt(PROMPT_LEN, seed=100 + i)
            sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, extra_args={"kv_eviction": policy})
            pair = []
            for _ in range(2):  # cold, then the same prompt again
                result = llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0]
                key = _key(recorder.scores, result)
                assert key is not None and _key(recorder.failures, result) is None, policy
                kept = recorder.kept.get(key)
                choice = kept.indices if kept is not None else recorder.evicted[key]
                pair.append((list(result.outputs[0].token_ids), result.num_cached_tokens or 0,
                             recorder.scores[key], choice))
            out[policy] = pair
    return out


@pytest.mark.parametrize("policy", POLICIES)
def test_a_prefix_cache_hit_changes_nothing(runs, policy):
    from kept_sets import differing_heads

    from vllm_kvevict.policies import build_policy

    (cold_tokens, cold_hit, cold_scores, cold_choice), (warm_tokens, warm_hit, warm_scores, warm_choice) = runs[policy]
    config = EvictionConfig.from_flat({"kv_eviction": policy, "kv_budget": BUDGET})
    needs = build_policy(config, BLOCK).needs
    assert cold_hit == 0
    if needs.query_stats or needs.attention_sums:
        assert warm_hit == 0  # every prompt query is read: recomputed
    else:
        assert warm_hit == (PROMPT_LEN - config.window) // BLOCK * BLOCK  # up to the window
    assert_scores_close(warm_scores, cold_scores, policy)
    policy_ = build_policy(config, BLOCK)
    if config.resolved_granularity == "head":
        replanned = policy_.plan_head(warm_scores, PROMPT_LEN)
        assert differing_heads(warm_choice, replanned.indices) == 0
    else:
        assert warm_choice == policy_.evicted_blocks(warm_scores, PROMPT_LEN)
    assert warm_tokens == cold_tokens
