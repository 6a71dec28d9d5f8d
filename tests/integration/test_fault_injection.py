"""Faults inside the engine harm only the request they hit (issue 17).

One engine serves, in one batch, requests whose eviction is forced to fail at each stage
(scoring in the attention layers, selection, a compaction broken off half-way, a failed
invariant check after it: ``SchedulerSide.fault_key``), a healthy evicting request, and opted-out
copies of the faulted prompts (the whole-cache answer). A faulted request is served whole (its
greedy output is the opted-out copy's), its compact blocks go back, the failure is recorded with
its stage, the healthy one evicts, and the pool is whole again afterwards; page and head
granularity.
"""

from __future__ import annotations

import pytest

from vllm_kvevict.vllm.inprocess import (
    block_pool,
    open_llm,
    random_prompt,
    record_evictions,
    recorded_key,
    scheduler_side,
)

pytestmark = pytest.mark.slow

PROMPT_LEN, NEW_TOKENS = 700, 6
STAGES = {"page": ("scoring", "selection", "invariant"), "head": ("scoring", "selection", "compaction", "invariant")}


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    with open_llm(str(tiny_llama_dir), max_model_len=2048, max_num_batched_tokens=1024, max_num_seqs=16,
                  enable_prefix_caching=False, additional_config={"kv_eviction": {"scorer": "snapkv", "budget": 0.2}}) as llm:
        scheduler_side(llm).fault_key = "kvevict_fault"
        yield llm, record_evictions(llm)


def _key(records: dict, output) -> str | None:
    return recorded_key(records, output.request_id)


@pytest.mark.parametrize("granularity", ["page", "head"])
def test_a_failing_eviction_serves_its_request_whole_and_harms_no_other(engine, granularity):
    from vllm import SamplingParams

    llm, recorder = engine
    stages = STAGES[granularity]
    prompts = [random_prompt(PROMPT_LEN, seed=40 + i) for i in range(len(stages) + 1)]

    def greedy(**extra):
        return SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, extra_args=extra)

    params = [greedy(kv_granularity=granularity, kvevict_fault=stage) for stage in stages]
    params.append(greedy(kv_granularity=granularity))  # healthy
    params += [greedy(kv_eviction="none") for _ in stages]  # the faulted prompts, whole
    free0 = block_pool(llm).get_num_free_blocks()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts + prompts[: len(stages)]], params, use_tqdm=False)
    for i, stage in enumerate(stages):
        faulted, whole = outs[i], outs[len(stages) + 1 + i]
        key = _key(recorder.failures, faulted)
        assert key is not None and recorder.failures[key].startswith(stage), (stage, recorder.failures)
        assert list(faulted.outputs[0].token_ids) == list(whole.outputs[0].token_ids), stage
        assert _key(recorder.kept, faulted) is None
    healthy = outs[len(stages)]
    assert _key(recorder.failures, healthy) is None
    assert _key(recorder.kept if granularity == "head" else recorder.evicted, healthy) is not None
    assert block_pool(llm).get_num_free_blocks() == free0
    assert not scheduler_side(llm).state.pending_compactions
