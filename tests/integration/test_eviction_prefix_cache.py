"""Prefix caching (vLLM's default) and eviction: same greedy outputs as with prefix caching off.

Cases: the same long prompt twice (the second run hits the cache up to the observation window,
which is always recomputed), and a prompt sharing a long prefix with an evicted request (it hits
the evicted request's prompt blocks, kept and freed alike: their contents never changed).
"""

from __future__ import annotations

import pytest

from vllm_kvevict.vllm.inprocess import open_llm, random_prompt, scheduler

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["page", "head"])
def granularity(request):
    return request.param


def _prompts() -> list[list[int]]:
    long = random_prompt(2060, seed=7)
    shared = long[:1500] + random_prompt(600, seed=8)
    return [long, long, shared]


def _run(model_dir, enable_prefix_caching: bool, granularity: str):
    """Run the prompts one after another (each after the previous finished)."""
    from vllm import SamplingParams

    from vllm_kvevict.vllm.scheduler.state import state_of

    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    with open_llm(
        str(model_dir),
        max_model_len=4096,
        max_num_batched_tokens=1024,
        enable_prefix_caching=enable_prefix_caching,
        additional_config={"kv_eviction": {"scorer": "snapkv", "budget": 0.1, "granularity": granularity}},
    ) as llm:
        results = [llm.generate([{"prompt_token_ids": p}], sp, use_tqdm=False)[0] for p in _prompts()]
        returned = state_of(scheduler(llm).kv_cache_manager).blocks_returned
    outs = [list(r.outputs[0].token_ids) for r in results]
    return outs, returned, [r.num_cached_tokens or 0 for r in results]


@pytest.fixture(scope="module")
def without_caching(tiny_llama_dir, granularity):
    return _run(tiny_llama_dir, enable_prefix_caching=False, granularity=granularity)


@pytest.fixture(scope="module")
def with_caching(tiny_llama_dir, without_caching, granularity):
    return _run(tiny_llama_dir, enable_prefix_caching=True, granularity=granularity)


def test_same_long_prompt_twice_same_output(with_caching, without_caching):
    (on, returned_on, hits_on), (off, returned_off, hits_off) = with_caching, without_caching
    assert hits_off == [0, 0, 0]
    # The second run hits the cache up to the window: floor((2060 - 32) / 32) blocks.
    assert hits_on[1] == (2060 - 32) // 32 * 32
    assert on[0] == off[0]
    assert on[1] == off[1] == on[0]
    assert returned_on == returned_off > 0


def test_prompt_sharing_prefix_with_evicted_request(with_caching, without_caching):
    on, off = with_caching[0], without_caching[0]
    assert with_caching[2][2] == 1500 // 32 * 32  # hit on the evicted request's prompt blocks
    assert on[2] == off[2]
