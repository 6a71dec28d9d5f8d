"""Preemption of a request with decode-time eviction (page granularity, tiny Llama): it
re-prefills, evicts again during decode, finishes, and no block leaks.

A 100-block KV cache, priority scheduling: the evicting request has the lowest priority, so
when two long high-priority requests arrive it is the one vLLM preempts.
"""

from __future__ import annotations

import pytest

from vllm_kvevict.vllm.inprocess import block_pool, open_llm, random_prompt, record_evictions, run_until_done, scheduler

pytestmark = pytest.mark.slow

BLOCK = 32
DECODE = {"kv_eviction": "snapkv", "kv_budget": 160, "kv_window": 16, "kv_decode_interval": 64,
          "kv_granularity": "page"}
#: h2o: its re-prefill's first chunk runs past the prompt (tokens whose sums start at zero), the
#: rest of it runs as decode rows of many queries, each adding its attention to the sums.
H2O = {**DECODE, "kv_eviction": "h2o"}


def _greedy(max_tokens: int, extra: dict):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, extra_args=extra)


@pytest.mark.parametrize("xargs", [DECODE, H2O], ids=["snapkv", "h2o"])
def test_preempted_request_evicts_again_during_decode_and_frees_everything(tiny_llama_dir, xargs):
    """A request with decode-time eviction is preempted by two larger high-priority requests:
    it re-prefills, evicts again during decode, finishes; no block leaks."""
    from vllm_kvevict.vllm.scheduler.state import state_of

    block_bytes = 2 * 2 * 2 * 32 * BLOCK * 4  # layers x (K, V) x KV heads x head dim x block x float32
    with open_llm(
        str(tiny_llama_dir),
        max_model_len=3000,
        max_num_batched_tokens=1024,
        kv_cache_memory_bytes=100 * block_bytes,
        scheduling_policy="priority",
        additional_config={"kv_eviction": {"scorer": "snapkv", "budget": 0.5, "granularity": "page"}},
    ) as engine_llm:
        recorder = record_evictions(engine_llm)
        engine, pool, sched = engine_llm.llm_engine, block_pool(engine_llm), scheduler(engine_llm)
        state = state_of(sched.kv_cache_manager)
        free0 = pool.get_num_free_blocks()
        victim = engine.add_request("victim", {"prompt_token_ids": random_prompt(900, seed=31)},
                                    _greedy(400, xargs), priority=10)
        while not recorder.decode.get(victim):
            engine.step()
        hog = _greedy(160, {"kv_eviction": "none"})
        for i in range(2):
            engine.add_request(f"hog{i}", {"prompt_token_ids": random_prompt(1400, seed=40 + i)}, hog, priority=0)
        preemptions, finished = run_until_done(engine_llm, victim)
        assert preemptions >= 1, "the scenario did not preempt the evicting request"
        decode = recorder.decode[victim]
        assert not recorder.failures, recorder.failures
        assert decode[-1]["seq_len"] > 900 + 200, "no decode-time eviction after the re-prefill"
        assert sorted(finished.values()) == [160, 160, 400]
        assert pool.get_num_free_blocks() == free0
        assert state.blocks_returned > 0
