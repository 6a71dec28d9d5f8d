"""Preemption of a request that evicted pages: it re-prefills, evicts again, and no block leaks.

A 100-block KV cache, priority scheduling: the evicting request has the lowest priority, so
when two long high-priority requests arrive it is the one vLLM preempts.
"""

from __future__ import annotations

import pytest

from vllm_kvevict.vllm.inprocess import block_pool, open_llm, random_prompt, run_until_done, scheduler

pytestmark = pytest.mark.slow

BLOCK_BYTES = 2 * 2 * 2 * 32 * 32 * 4  # layers x (K, V) x KV heads x head dim x block x float32


@pytest.mark.parametrize("granularity", ["page", "head"])
def test_preempted_evicted_request_re_evicts_and_frees_everything(tiny_llama_dir, granularity):
    from vllm import SamplingParams

    from vllm_kvevict.vllm.scheduler.state import state_of

    def greedy(n, **extra):
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, extra_args=extra or None)

    with open_llm(
        str(tiny_llama_dir),
        max_model_len=3000,
        max_num_batched_tokens=1024,
        kv_cache_memory_bytes=100 * BLOCK_BYTES,
        scheduling_policy="priority",
        additional_config={"kv_eviction": {"scorer": "snapkv", "budget": 0.1, "granularity": granularity}},
    ) as llm:
        engine, pool, sched = llm.llm_engine, block_pool(llm), scheduler(llm)
        state = state_of(sched.kv_cache_manager)
        free0 = pool.get_num_free_blocks()
        victim = engine.add_request("victim", {"prompt_token_ids": random_prompt(2060, seed=31)}, greedy(120), priority=10)
        while state.blocks_returned == 0:
            engine.step()
        first_eviction = state.blocks_returned
        for i in range(2):
            engine.add_request(
                f"hog{i}", {"prompt_token_ids": random_prompt(1400, seed=40 + i)}, greedy(160, kv_eviction="none"), priority=0
            )
        preemptions, finished = run_until_done(llm, victim)
        assert preemptions >= 1, "the scenario did not preempt the evicting request"
        assert state.blocks_returned > first_eviction  # evicted again after its re-prefill
        assert sorted(finished.values()) == [120, 160, 160]
        assert pool.get_num_free_blocks() == free0
