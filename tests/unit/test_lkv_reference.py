"""The reference engine with ``lkv`` policies (tiny random Llama, random artifact made for it)."""

from __future__ import annotations

import pytest
import torch

from vllm_kvevict import policies
from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.lkv.artifact import LKVArtifactError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT_LEN = 200


@pytest.fixture(scope="module")
def prefilled(tiny_engine):
    ids = torch.randint(10, 40000, (PROMPT_LEN,), generator=torch.Generator().manual_seed(4))
    return tiny_engine.prefill(ids)


@pytest.mark.parametrize("scorer,allocation", [("lkv", "lkv"), ("lkv", "adakv"), ("snapkv", "lkv")])
def test_head_mode_cache_is_the_lkv_policys_kept_set(tiny_engine, prefilled, tiny_lkv_artifact, scorer, allocation):
    config = EvictionConfig(scorer=scorer, allocation=allocation, budget=0.3, head_selection="token", window=16,
                            lkv_artifact=str(tiny_lkv_artifact))
    assert prefilled.model == tiny_engine.identity == prefilled.prefix(100).model
    expected = policies.compute_kept(tiny_engine.layer_inputs(prefilled, config), config, model=tiny_engine.identity)
    out = tiny_engine.generate(prefilled, config, 2, stop_on_eos=False, return_cache=True)
    assert torch.equal(out.kept_per_head, expected.head_budgets)
    for layer, row in enumerate(out.cache.stores):
        for head, store in enumerate(row):
            idx = expected.indices[layer][head]
            assert torch.equal(store.keys[: idx.numel()], prefilled.keys[layer][head, idx])


def test_lkv_without_an_artifact_for_the_model_is_refused_with_the_fix(tiny_engine, prefilled):
    with pytest.raises(LKVArtifactError, match="no packaged LKV artifact for LlamaForCausalLM .*kv_lkv_artifact"):
        tiny_engine.generate(prefilled, EvictionConfig(scorer="lkv", budget=0.3), 2)
