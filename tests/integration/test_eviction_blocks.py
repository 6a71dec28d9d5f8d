"""Page eviction inside real vLLM (CPU, tiny random Llama): blocks really go back to vLLM's pool,
attention over the compacted table is exact, and nothing leaks on finish, abort or preemption.

Counts come from vLLM's own ``BlockPool`` / KV-cache manager (engine core in this process).
"""

from __future__ import annotations

import math

import pytest
import torch

from vllm_kvevict.vllm.inprocess import block_pool, held_blocks, open_llm, random_prompt, record_evictions, scheduler

pytestmark = pytest.mark.slow

BLOCK = 32
BUDGET = 0.1
PROMPT_LEN = 2060  # 65 blocks, the last one partial; with 1024-token chunks the window straddles
CHUNK = 1024


@pytest.fixture(scope="module")
def evict_llm(tiny_llama_dir, stock_outputs):  # stock_outputs first: one engine alive at a time
    with open_llm(
        str(tiny_llama_dir),
        max_model_len=4096,
        max_num_batched_tokens=CHUNK,
        additional_config={"kv_eviction": {"scorer": "snapkv", "budget": BUDGET, "granularity": "page"}},
    ) as llm:
        record_evictions(llm)
        yield llm


def _greedy(max_tokens: int, **extra):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, extra_args=extra or None)


def _evicted_of(output):
    """Evicted block indices the worker chose for a finished ``RequestOutput`` (None: none)."""
    from vllm_kvevict.vllm.inprocess import worker_side

    hist = worker_side(None).recorder.evicted
    if output.request_id in hist:
        return hist[output.request_id]
    matches = [k for k in hist if k.startswith(f"{output.request_id}-")]
    return hist[matches[-1]] if matches else None


def _sched_state(llm):
    from vllm_kvevict.vllm.scheduler.state import state_of

    return state_of(scheduler(llm).kv_cache_manager)


def test_connector_and_backend_are_in_place(evict_llm):
    from vllm_kvevict.vllm.connector import KVEvictConnector

    assert isinstance(scheduler(evict_llm).connector, KVEvictConnector)
    assert _sched_state(evict_llm) is not None


def test_prefill_holds_budget_blocks_then_finish_frees_all(evict_llm):
    engine, pool = evict_llm.llm_engine, block_pool(evict_llm)
    free0 = pool.get_num_free_blocks()
    prompt = random_prompt(PROMPT_LEN, seed=1)
    req_id = engine.add_request("blocks", {"prompt_token_ids": prompt}, _greedy(40))
    held_after_prefill = cached_at_eviction = cached_later = None
    manager = scheduler(evict_llm).kv_cache_manager.coordinator.single_type_managers[0]
    while engine.has_unfinished_requests():
        engine.step()
        req = scheduler(evict_llm).requests.get(req_id)
        if req is None:
            continue
        if held_after_prefill is None and req.num_output_tokens >= 1:
            held_after_prefill = free0 - pool.get_num_free_blocks()
            assert held_after_prefill == held_blocks(evict_llm, req_id)
            cached_at_eviction = manager.num_cached_block.get(req_id)
        elif held_after_prefill is not None:
            cached_later = manager.num_cached_block.get(req_id)
    prompt_blocks = math.ceil(PROMPT_LEN / BLOCK)
    assert held_after_prefill is not None
    assert held_after_prefill <= math.ceil(BUDGET * prompt_blocks) + 2, held_after_prefill
    # 40 decoded tokens fill a block after eviction: it must not enter the prefix cache.
    assert cached_later == cached_at_eviction
    assert pool.get_num_free_blocks() == free0


def test_decode_over_evicted_pages_matches_masked_hf(evict_llm, tiny_llama_dir):
    """vLLM's stock kernel over the compacted table == HF attention with evicted slots masked."""
    from transformers import AutoModelForCausalLM

    prompt = random_prompt(PROMPT_LEN, seed=2)
    out = evict_llm.generate([{"prompt_token_ids": prompt}], _greedy(12), use_tqdm=False)
    got = list(out[0].outputs[0].token_ids)
    evicted = _evicted_of(out[0])
    assert len(evicted) >= math.ceil(PROMPT_LEN / BLOCK) - math.ceil(BUDGET * PROMPT_LEN / BLOCK) - 3

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)

    def hf_greedy(masked_blocks):
        mask = torch.ones(1, PROMPT_LEN + len(got), dtype=torch.long)
        for b in masked_blocks:
            mask[0, b * BLOCK : (b + 1) * BLOCK] = 0
        with torch.no_grad():
            res = model(torch.tensor([prompt]), use_cache=True)
            toks = [int(res.logits[0, -1].argmax())]
            for t in range(1, len(got)):
                res = model(
                    torch.tensor([[toks[-1]]]),
                    past_key_values=res.past_key_values,
                    attention_mask=mask[:, : PROMPT_LEN + t],
                    position_ids=torch.tensor([[PROMPT_LEN + t - 1]]),
                    use_cache=True,
                )
                toks.append(int(res.logits[0, -1].argmax()))
        return toks

    assert got == hf_greedy(evicted)
    assert got != hf_greedy([]), "eviction changed nothing: the check above proves nothing"


def test_abort_after_eviction_frees_all(evict_llm):
    engine, pool = evict_llm.llm_engine, block_pool(evict_llm)
    free0 = pool.get_num_free_blocks()
    req_id = engine.add_request("abort", {"prompt_token_ids": random_prompt(PROMPT_LEN, seed=3)}, _greedy(200))
    for _ in range(20):
        engine.step()
        req = scheduler(evict_llm).requests.get(req_id)
        if req is not None and req.num_output_tokens >= 3:
            break
    assert held_blocks(evict_llm, req_id) <= math.ceil(BUDGET * math.ceil(PROMPT_LEN / BLOCK)) + 2
    engine.abort_request([req_id])
    while engine.has_unfinished_requests():
        engine.step()
    assert pool.get_num_free_blocks() == free0


def test_per_request_opt_out_and_full_budget_equal_stock(evict_llm, stock_outputs):
    prompts, expected = stock_outputs
    for extra in ({"kv_eviction": "none"}, {"kv_budget": 1.0}, {"kv_eviction": "knorm", "kv_budget": 1.0}):
        outs = evict_llm.generate([{"prompt_token_ids": p} for p in prompts], _greedy(16, **extra), use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outs] == expected, extra


def test_requests_with_different_policies_share_a_batch(evict_llm):
    """knorm, snapkv and none in one batch: each evicts (or not) by its own settings."""
    pool = block_pool(evict_llm)
    free0 = pool.get_num_free_blocks()
    before = _sched_state(evict_llm).blocks_returned
    prompts = [random_prompt(PROMPT_LEN, seed=s) for s in (10, 11, 12)]
    params = [_greedy(4, kv_eviction="knorm", kv_budget=0.2), _greedy(4), _greedy(4, kv_eviction="none")]
    outs = evict_llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    evicted = [_evicted_of(o) for o in outs]
    blocks = math.ceil(PROMPT_LEN / BLOCK)
    assert evicted[2] is None
    assert blocks - len(evicted[0]) <= math.ceil(0.2 * blocks) + 2
    assert blocks - len(evicted[1]) <= math.ceil(BUDGET * blocks) + 2
    assert len(evicted[0]) < len(evicted[1])
    assert _sched_state(evict_llm).blocks_returned - before == len(evicted[0]) + len(evicted[1])
    assert pool.get_num_free_blocks() == free0


@pytest.fixture(scope="module")
def stock_outputs(tiny_llama_dir):
    """Greedy outputs of stock vLLM (no eviction configured) on a few prompts."""
    from vllm import SamplingParams

    prompts = [random_prompt(n, seed=100 + n) for n in (40, 700, 2100)]
    # A separate engine must not be alive at the same time as evict_llm: run it to completion
    # before evict_llm starts (pytest builds this fixture first when both are requested).
    with open_llm(str(tiny_llama_dir), max_model_len=4096, max_num_batched_tokens=CHUNK) as llm:
        outs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
            use_tqdm=False,
        )
        return prompts, [list(o.outputs[0].token_ids) for o in outs]
