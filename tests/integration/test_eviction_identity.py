"""Eviction configured but keeping everything == stock vLLM, token for token (greedy, SmolLM2).

``none`` never scores; a token budget above the prompt length runs the whole scoring path
(window stash, key gathering, the scorer, page selection) and keeps every page.

Also: with vLLM's default multiprocess engine core (scheduler and worker in another process),
eviction happens (output differs from stock) and gives exactly the in-process output.
"""

from __future__ import annotations

import pytest

from vllm_kvevict.vllm.inprocess import open_llm, random_prompt

pytestmark = pytest.mark.slow

TEXT = (
    "The lighthouse keeper wrote in his log every night. He noted the wind, the ships that "
    "passed and the colour of the sea. One winter evening a small boat appeared near the rocks. "
)


def _prompts(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    short = tok(TEXT)["input_ids"]
    long = tok(TEXT * 30)["input_ids"][:1000]
    return [short, long]


def _outputs(model_dir, prompts, **kwargs):
    from vllm import SamplingParams

    from vllm_kvevict.vllm.inprocess import record_evictions, worker_side

    sp = SamplingParams(max_tokens=24, temperature=0.0)
    with open_llm(str(model_dir), max_model_len=4096, kv_cache_memory_bytes=256 << 20, **kwargs) as llm:
        recorder = record_evictions(llm) if worker_side(llm) is not None else None
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    assert recorder is None or not recorder.failures
    return [list(o.outputs[0].token_ids) for o in outs], recorder


@pytest.fixture(scope="module")
def prompts(smollm2_dir):
    return _prompts(smollm2_dir)


@pytest.fixture(scope="module")
def stock(smollm2_dir, prompts):
    return _outputs(smollm2_dir, prompts)[0]


@pytest.mark.parametrize(
    "kv_eviction",
    [{"scorer": "none"}, {"scorer": "criticalkv", "budget": 4096}],
    ids=["none", "criticalkv-all-tokens"],
)
def test_keep_everything_is_token_identical_to_stock(smollm2_dir, prompts, stock, kv_eviction):
    got, recorder = _outputs(smollm2_dir, prompts, additional_config={"kv_eviction": kv_eviction})
    assert got == stock
    if kv_eviction["scorer"] == "none":
        assert recorder is None  # no connector: no eviction machinery at all
    else:  # the token budget scored both prompts, and compacting would not release a block
        assert len(recorder.scores) == 2 and not recorder.kept and not recorder.evicted


def test_multiprocess_engine_core_evicts_like_in_process(tiny_llama_dir):
    """The connector's messages cross the engine-core process boundary (vLLM's default mode)."""
    from vllm import LLM, SamplingParams

    prompt = random_prompt(2060, seed=21)
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    config = {"kv_eviction": {"scorer": "snapkv", "budget": 0.1}}
    common = dict(max_model_len=4096, max_num_batched_tokens=1024)
    with open_llm(str(tiny_llama_dir), additional_config=config, **common) as llm:
        in_process = list(llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0].outputs[0].token_ids)
    with open_llm(str(tiny_llama_dir), **common) as llm:
        stock = list(llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0].outputs[0].token_ids)
    llm = LLM(
        str(tiny_llama_dir), dtype="float32", enforce_eager=True, block_size=32,
        kv_cache_memory_bytes=64 << 20, additional_config=config, **common,
    )
    try:
        multi = list(llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0].outputs[0].token_ids)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
    assert in_process != stock
    assert multi == in_process
