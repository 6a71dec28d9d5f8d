"""Head granularity on SmolLM2 in real vLLM: kept sets and greedy outputs equal the reference's.

Its own module so that no other engine is alive (the worker state is per process).
"""

from __future__ import annotations

import pytest
from test_head_granularity import (
    BLOCK,
    NEW_TOKENS,
    POLICIES,
    _config,
    _differing_heads,
    _reference,
    _serve,
)

from vllm_kvevict.vllm.inprocess import random_prompt

pytestmark = pytest.mark.slow


def test_smollm2_kept_sets_and_outputs_equal_reference(smollm2_dir):
    prompt = random_prompt(1100, seed=11, high=40000)
    names = ["criticalkv-adakv", "snapkv-adakv"]
    served = _serve(smollm2_dir, prompt, {n: POLICIES[n] for n in names}, max_model_len=2048,
                    kv_cache_memory_bytes=512 << 20)
    engine, prefilled = _reference(smollm2_dir, prompt)
    for name in names:
        tokens, kept = served[name]
        assert _differing_heads(kept, engine.kept_indices(prefilled, _config(name), BLOCK)) == 0, name
        want = engine.generate(prefilled, _config(name), NEW_TOKENS, stop_on_eos=False, block_size=BLOCK).token_ids
        assert tokens == list(want), name
