"""Async scheduling (vLLM's GPU default; opt-in on CPU): one step in flight while the scheduler
processes the previous output. Eviction must give the same output as synchronous scheduling,
free the same blocks, and leave the pool whole."""

from __future__ import annotations

import pytest

from vllm_kvevict.vllm.inprocess import block_pool, open_llm, random_prompt, scheduler

pytestmark = pytest.mark.slow

CONFIG = {"kv_eviction": {"scorer": "snapkv", "budget": 0.1}}


def _run(model_dir, async_scheduling: bool):
    from vllm import SamplingParams

    from vllm_kvevict.vllm.manager import state_of

    prompts = [random_prompt(2060, seed=61), random_prompt(1500, seed=62)]
    sp = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    with open_llm(
        str(model_dir), max_model_len=4096, max_num_batched_tokens=1024,
        async_scheduling=async_scheduling, additional_config=CONFIG,
    ) as llm:
        assert (type(scheduler(llm)).__name__ == "AsyncScheduler") == async_scheduling
        free0 = block_pool(llm).get_num_free_blocks()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        returned = state_of(scheduler(llm).kv_cache_manager).blocks_returned
        return [list(o.outputs[0].token_ids) for o in outs], returned, free0, block_pool(llm).get_num_free_blocks()


def test_async_scheduling_matches_sync(tiny_llama_dir):
    sync_out, sync_returned, free0, free1 = _run(tiny_llama_dir, False)
    assert free1 == free0 and sync_returned > 0
    async_out, async_returned, free0, free1 = _run(tiny_llama_dir, True)
    assert free1 == free0
    assert async_returned == sync_returned
    assert async_out == sync_out
