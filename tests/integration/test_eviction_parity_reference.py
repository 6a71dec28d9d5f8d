"""vLLM's page choice == the reference engine's page mode, scorer by scorer (tiny Llama).

One vLLM engine serves one request per scorer in the same batch (per-request ``vllm_xargs``),
prefilled in 256-token chunks so window queries and query statistics are gathered across
chunks (window queries, pre-RoPE query statistics and h2o's attention sums are gathered
across chunks); the reference engine (HF transformers) scores the whole prompt at once. Scores must
agree to rounding, and the evicted blocks must be exactly the shared page selection of the served
scores (why not bit-equal to the reference's own choice: tests/kept_sets.py).
"""

from __future__ import annotations

import pytest
import torch

from vllm_kvevict.config import SCORERS, EvictionConfig
from vllm_kvevict.vllm.inprocess import open_llm, random_prompt, recorded_key

pytestmark = pytest.mark.slow

BLOCK, BUDGET, PROMPT_LEN = 32, 0.25, 700
#: Floors above the budget's int(700 * 0.25) = 175 tokens (6 pages): 320 tokens keep 10 pages.
FLOORED = {"snapkv+floor": {"kv_eviction": "snapkv", "kv_min_tokens": 320},
           "streamingllm+floor": {"kv_eviction": "streamingllm", "kv_min_tokens": 320}}
POLICIES = [s for s in SCORERS if s != "none"] + list(FLOORED)


def flat(policy: str, artifact) -> dict:
    """The request's policy; ``lkv`` reads the random artifact made for the tiny Llama."""
    if policy in FLOORED:
        return FLOORED[policy]
    return {"kv_eviction": policy, **({"kv_lkv_artifact": str(artifact)} if policy == "lkv" else {})}


def page_config(policy: str, artifact) -> EvictionConfig:
    return EvictionConfig.from_flat({**flat(policy, artifact), "kv_budget": BUDGET, "kv_granularity": "page"})


@pytest.fixture(scope="module")
def prompt():
    return random_prompt(PROMPT_LEN, seed=5)


@pytest.fixture(scope="module")
def vllm_evicted(tiny_llama_dir, prompt, tiny_lkv_artifact):
    from vllm import SamplingParams

    from vllm_kvevict.vllm.inprocess import record_evictions

    with open_llm(
        str(tiny_llama_dir),
        max_model_len=2048,
        max_num_batched_tokens=256,
        max_num_seqs=len(POLICIES),
        enable_prefix_caching=False,
        additional_config={"kv_eviction": {"scorer": "snapkv", "budget": BUDGET, "granularity": "page"}},
    ) as llm:
        recorder = record_evictions(llm)
        params = [
            SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, extra_args=flat(p, tiny_lkv_artifact))
            for p in POLICIES
        ]
        outs = llm.generate([{"prompt_token_ids": prompt}] * len(POLICIES), params, use_tqdm=False)
        assert not recorder.failures
        history, scores = recorder.evicted, recorder.scores
        result = {}
        for policy, out in zip(POLICIES, outs):
            key = recorded_key(history, out.request_id)
            result[policy] = (sorted(history[key]), scores[key])
        return result


@pytest.mark.parametrize("policy", POLICIES)
def test_token_scores_match_reference(policy, vllm_evicted, reference_prefilled, tiny_lkv_artifact):
    """Every layer's ``[Hkv, L]`` scores: same +inf marks, finite values equal to rounding."""
    from kept_sets import assert_scores_close

    from vllm_kvevict.policies import build_policy

    config = page_config(policy, tiny_lkv_artifact)
    policy_obj = build_policy(config, BLOCK, model=reference_prefilled.model)
    want = [policy_obj.score_layer(layer) for layer in reference_prefilled.layer_inputs(config)]
    assert_scores_close(vllm_evicted[policy][1], want, policy)


@pytest.mark.parametrize("policy", POLICIES)
def test_evicted_pages_are_the_page_selection_of_the_scores(policy, vllm_evicted, tiny_lkv_artifact):
    from vllm_kvevict.policies import build_policy

    config = page_config(policy, tiny_lkv_artifact)
    evicted, scores = vllm_evicted[policy]
    assert evicted, f"{policy}: nothing evicted"
    assert evicted == build_policy(config, BLOCK).evicted_blocks(scores, PROMPT_LEN)


@pytest.mark.parametrize("policy", list(FLOORED))
def test_the_floor_keeps_its_pages(policy, vllm_evicted, tiny_lkv_artifact):
    """With the floor the request keeps ceil(320 / 32) = 10 of its 22 pages (6 without)."""
    config = page_config(policy, tiny_lkv_artifact)
    assert config.budget_tokens(PROMPT_LEN) == 320
    evicted, _ = vllm_evicted[policy]
    assert len(evicted) == PROMPT_LEN // BLOCK + 1 - 10


@pytest.fixture(scope="module")
def reference_prefilled(tiny_llama_dir, prompt):
    import torch

    from vllm_kvevict.reference.engine import ReferenceEngine

    engine = ReferenceEngine(str(tiny_llama_dir))
    return engine.prefill(torch.tensor(prompt))
