"""The diagnostic on the real SmolLM2-135M-Instruct: the head-token needle failure of
benchmarks/quality/HEAD_VS_PAGE.md is a projection failure, and whole pages per head repair it
(slow: model load, a 1k-token prefill and ~60 reference forwards on a shared CPU)."""

from __future__ import annotations

import pytest

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.evaluation.diagnose_run import diagnose_task
from vllm_kvevict.evaluation.tasks import make_task
from vllm_kvevict.reference.engine import ReferenceEngine

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def engine(smollm2_dir) -> ReferenceEngine:
    return ReferenceEngine(smollm2_dir)


def test_head_token_needle_loss_is_projection_and_head_pages_keep_it(engine):
    task = make_task("niah_single", engine.tokenizer, 1024, seed=0)
    prefilled = engine.prefill(task.prompt_ids)
    token = diagnose_task(engine, task, EvictionConfig(scorer="criticalkv", budget=0.2, head_selection="token", min_tokens=0),
                          prefilled=prefilled, block_size=32, m=2, units=4, seed=0)
    assert token["greedy_full"] and token["score"] == 0.0  # the documented failure: digits dropped
    assert token["statuses"]["partial_hidden"] > token["statuses"]["lost_hidden"]
    assert token["dominant"] == "projection"
    assert token["gains"]["projection"] > 0.8 * token["gap"]
    pages = diagnose_task(engine, task, EvictionConfig(scorer="criticalkv", budget=0.2, head_selection="page", min_tokens=0),
                          prefilled=prefilled, block_size=32, m=2, units=4, seed=0)
    assert pages["score"] == 1.0 and pages["statuses"]["partial_hidden"] == 0
    assert pages["dominant"] == "none"
