"""Head granularity on SmolLM2 in real vLLM: kept sets and greedy outputs equal the reference's.

Its own module so that no other engine is alive (the worker state is per process).
"""

from __future__ import annotations

import pytest
from test_head_granularity import (
    POLICIES,
    _reference,
    _serve,
    check_against_reference,
    reference_generation,
)

from vllm_kvevict.vllm.inprocess import random_prompt

pytestmark = pytest.mark.slow


def test_smollm2_kept_sets_and_outputs_equal_reference(smollm2_dir):
    prompt = random_prompt(1100, seed=11, high=40000)
    names = ["criticalkv-adakv", "snapkv-adakv", "lkv-lkv"]  # lkv: the packaged artifact, found by default
    served = _serve(smollm2_dir, prompt, {n: POLICIES[n] for n in names}, max_model_len=2048,
                    kv_cache_memory_bytes=512 << 20)
    reference = _reference(smollm2_dir, prompt)
    for name in names:
        tokens, kept = served[name]
        check_against_reference(name, kept, *reference)
        assert tokens == reference_generation(name, kept, *reference), name
