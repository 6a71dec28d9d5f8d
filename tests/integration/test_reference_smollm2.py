"""The reference engine on the real SmolLM2-135M-Instruct (slow: a 135M model on a shared CPU)."""

from __future__ import annotations

import pytest

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.evaluation.tasks import make_suite
from vllm_kvevict.reference.engine import ReferenceEngine
from vllm_kvevict.reference.study import run_task, summarize

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def engine(smollm2_dir) -> ReferenceEngine:
    return ReferenceEngine(smollm2_dir)


def test_full_cache_is_token_identical_to_hf_generate(engine):
    ids = engine.encode("Write a long, detailed story about a lighthouse keeper who finds a map.", chat=True)
    n = 200
    ours = engine.generate(engine.prefill(ids), EvictionConfig(), n)
    hf = engine.model.generate(ids.view(1, -1), do_sample=False, max_new_tokens=n)[0, ids.numel() :].tolist()
    assert len(hf) > 100  # a real answer, not an early EOS
    assert ours.token_ids == hf


def test_needle_found_with_full_cache_and_kept_at_quarter_budget(engine):
    """Two 1.5k-token needle prompts: full cache answers both; criticalkv at 0.25 keeps about a
    quarter of every head in head mode (whole pages per head) and of the blocks in page mode."""
    tasks = make_suite(["niah_single"], engine.tokenizer, [1500], 2, seed=7)
    configs = [
        EvictionConfig(),
        EvictionConfig(scorer="criticalkv", budget=0.25, granularity="head"),
        EvictionConfig(scorer="criticalkv", budget=0.25, granularity="page"),
    ]
    results = [r for task in tasks for r in run_task(engine, task, configs, ["inside"], block_size=16)]
    rows = {row["policy"]: row for row in summarize(results)}
    assert rows["full"]["accuracy"] == 1.0
    head = rows["criticalkv/adakv/head"]
    assert 0.25 <= head["memory_kept"] <= 0.25 + 16 / 1400  # whole 16-token pages per head
    page = rows["criticalkv/adakv/page"]
    assert 0.25 <= page["memory_kept"] <= 0.25 + 3 * 16 / 1400
