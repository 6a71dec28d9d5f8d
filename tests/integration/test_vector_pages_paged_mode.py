"""VECTOR rows under ``KVEVICT_CPU_HEAD_DECODE=paged`` (the GPU path run inside vLLM-CPU): the
CUDA backends do not carry key-only pages yet, so the CPU backend sends rows with key-only
tokens to the torch path and the other compacted rows of the same step to the GPU path.

Tiny random GQA Llama (float32), a VECTOR artifact calibrated on it by the command itself; one
VECTOR request and one plain single-token request in one batch. Greedy outputs equal the
reference engine's compacted generation over the served kept sets.
"""

from __future__ import annotations

import pytest
import torch
from test_head_granularity import NEW_TOKENS, _serve

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.kernels._backend import HAVE_TRITON
from vllm_kvevict.vllm.backends import head_rows, head_rows_paged
from vllm_kvevict.vllm.inprocess import random_prompt

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")]

BLOCK, BUDGET, PROMPT_LEN = 32, 0.25, 700


def policies(artifact) -> dict:
    # no R^2 gate: the tiny artifact's held-out R^2 is about 0.1 (the default gate would keep every head whole)
    return {"snapkv-vector": {"kv_eviction": "snapkv", "kv_vector": "on", "kv_vector_artifact": str(artifact),
                              "kv_vector_min_r2": 0.0},
            "snapkv-tokens": {"kv_eviction": "snapkv", "kv_head_selection": "token"}}


@pytest.fixture(scope="module")
def prompt():
    return random_prompt(PROMPT_LEN, seed=23)


@pytest.fixture(scope="module")
def served(tiny_llama_dir, tiny_vector_artifact, prompt):
    paged, rebuilt = [], []
    decode, values = head_rows_paged.decode_head_rows, head_rows.entry_values

    def counted_decode(rows, *args, **kwargs):
        paged.append(int(rows.query_index.numel()))
        return decode(rows, *args, **kwargs)

    def counted_values(*args):
        rebuilt.append(args[1])
        return values(*args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(head_rows_paged.SWITCH, "paged")
        mp.setattr(head_rows_paged, "decode_head_rows", counted_decode)
        mp.setattr(head_rows, "entry_values", counted_values)
        result = _serve(tiny_llama_dir, prompt, policies(tiny_vector_artifact), max_model_len=2048,
                        enable_prefix_caching=False, kv_cache_memory_bytes=16 << 20)
    return result, paged, rebuilt


def test_key_only_rows_take_the_torch_path_and_the_others_the_gpu_path(served):
    result, paged, rebuilt = served
    assert result["snapkv-vector"][1].key_only is not None
    assert paged and max(paged) == 1, paged  # only the plain request's row in the GPU path
    assert len(rebuilt) >= 2 * (NEW_TOKENS - 1), len(rebuilt)  # 2 layers, every decode step


@pytest.mark.parametrize("name", ["snapkv-vector", "snapkv-tokens"])
def test_greedy_output_equals_the_reference(name, served, tiny_llama_dir, tiny_vector_artifact, prompt):
    from vllm_kvevict.reference.engine import ReferenceEngine

    result, _, _ = served
    tokens, kept = result[name]
    engine = ReferenceEngine(str(tiny_llama_dir))
    prefilled = engine.prefill(torch.tensor(prompt))
    config = EvictionConfig.from_flat({**policies(tiny_vector_artifact)[name], "kv_budget": BUDGET,
                                       "kv_granularity": "head"})
    want = engine.generate(prefilled, config, NEW_TOKENS, stop_on_eos=False, kept=kept, block_size=BLOCK)
    assert len(tokens) == NEW_TOKENS and tokens == list(want.token_ids), name
