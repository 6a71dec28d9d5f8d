"""The GPU path of compacted rows inside vLLM-CPU (issue 15's CPU check).

With ``KVEVICT_CPU_HEAD_DECODE=paged`` the CPU backend decodes compacted rows exactly as the
CUDA backends do (``backends/head_batch.py``: page tables in the persistent buffers, one
Triton two-segment call per layer, here under ``TRITON_INTERPRET=1``) on the cache unpacked into
the GPU layout (``backends/head_rows_paged.py``). Greedy outputs equal the torch path's and the
reference engine's compacted generation over the served kept sets, for whole pages and single
tokens per head.
"""

from __future__ import annotations

import pytest
from test_head_granularity import NEW_TOKENS, POLICIES, _reference, _serve, reference_generation

from vllm_kvevict.kernels._backend import HAVE_TRITON
from vllm_kvevict.vllm.backends import head_rows_paged
from vllm_kvevict.vllm.inprocess import random_prompt

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")]

NAMES = ["snapkv-adakv", "snapkv-adakv-tokens", "criticalkv-adakv"]
PROMPT_LEN = 700


@pytest.fixture(scope="module")
def prompt():
    return random_prompt(PROMPT_LEN, seed=5)


def _served(tiny_llama_dir, prompt):
    return _serve(tiny_llama_dir, prompt, {n: POLICIES[n] for n in NAMES}, max_model_len=2048,
                  enable_prefix_caching=False, kv_cache_memory_bytes=16 << 20)


@pytest.fixture(scope="module")
def torch_path(tiny_llama_dir, prompt):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(head_rows_paged.SWITCH, "torch")  # every compacted row (whole pages too) through torch
        return _served(tiny_llama_dir, prompt)


@pytest.fixture(scope="module")
def paged_path(tiny_llama_dir, prompt, torch_path):  # torch_path first: one engine alive at a time
    calls = []
    original = head_rows_paged.decode_head_rows

    def counted(rows, *args, **kwargs):
        calls.append(int(rows.query_index.numel()))
        return original(rows, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(head_rows_paged.SWITCH, "paged")
        mp.setattr(head_rows_paged, "decode_head_rows", counted)
        served = _served(tiny_llama_dir, prompt)
    return served, calls


def test_paged_path_ran_for_every_compacted_row(paged_path):
    served, calls = paged_path
    assert calls, "the GPU path never ran"
    # every decode step after compaction: one call per layer, one kernel row per compacted request
    assert max(calls) == len(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_paged_path_greedy_equals_torch_path_and_reference(name, torch_path, paged_path, tiny_llama_dir, prompt):
    served, _ = paged_path
    tokens, kept = served[name]
    assert len(tokens) == NEW_TOKENS
    assert tokens == torch_path[name][0]
    engine, prefilled = _reference(tiny_llama_dir, prompt)
    assert tokens == reference_generation(name, kept, engine, prefilled)


def test_switch_refuses_other_values(monkeypatch):
    monkeypatch.setenv(head_rows_paged.SWITCH, "triton")
    with pytest.raises(ValueError, match="KVEVICT_CPU_HEAD_DECODE"):
        head_rows_paged.paged_path_selected()
