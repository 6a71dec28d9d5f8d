"""VECTOR in the reference engine (tiny random Llama, an artifact calibrated on it): whole,
key-only and evicted tokens per head, values rebuilt for key-only ones, memory of plain eviction."""

from __future__ import annotations

import pytest
import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.reference.key_only import merged
from vllm_kvevict.vector import load_artifact, VectorArtifactError


@pytest.fixture(scope="module")
def prefilled(tiny_engine, one_torch_thread):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, tiny_engine.model.config.vocab_size, (240,), generator=g)
    return tiny_engine.prefill(ids)


@pytest.mark.parametrize("scorer", ["keydiff", "snapkv", "criticalkv"])
@pytest.mark.parametrize("budget", [0.1, 0.25])
def test_routes_rebuilt_values_and_memory(tiny_engine, prefilled, tiny_vector_artifact, scorer, budget):
    plain = EvictionConfig(scorer=scorer, budget=budget, window=8)
    # the tiny artifact's held-out R^2 is about 0.1: no R^2 gate, or no head would hold key-only tokens
    vector = plain.model_copy(update={"vector": "on", "vector_artifact": str(tiny_vector_artifact), "vector_min_r2": 0.0})
    base = tiny_engine.generate(prefilled, plain, 4, stop_on_eos=False)
    gen = tiny_engine.generate(prefilled, vector, 4, stop_on_eos=False, return_cache=True)
    assert gen.memory_fraction == pytest.approx(base.memory_fraction)  # equal memory at the budget
    assert any(idx.numel() for row in gen.key_only for idx in row)
    artifact = load_artifact(tiny_vector_artifact)
    L = prefilled.prompt_len
    for layer in range(prefilled.num_layers):
        rebuilt = artifact.reconstruct(layer, prefilled.keys[layer], torch.arange(L))
        for g, store in enumerate(gen.cache.stores[layer]):
            positions = store.positions[: gen.kept[layer][g].numel()]
            assert torch.equal(positions, gen.kept[layer][g])
            key_only = torch.isin(positions, gen.key_only[layer][g])
            vals = store.values[: positions.numel()]
            assert torch.equal(vals[~key_only], prefilled.values[layer][g, positions[~key_only]])
            assert torch.equal(vals[key_only], rebuilt[g, positions[key_only]])
            assert torch.equal(store.keys[: positions.numel()], prefilled.keys[layer][g, positions])


def test_attention_reads_the_rebuilt_values(tiny_engine, prefilled, tiny_vector_artifact):
    """The same decode as a plain cache of the same tokens whose key-only values were replaced."""
    from dataclasses import replace

    from vllm_kvevict.reference.key_only import routed_values

    config = EvictionConfig(scorer="keydiff", budget=0.2, window=8, vector="on", vector_min_r2=0.0,
                            vector_artifact=str(tiny_vector_artifact))
    kept = tiny_engine.kept_set(prefilled, config)
    gen = tiny_engine.generate(prefilled, config, 6, stop_on_eos=False, return_logits=True)
    values = routed_values(prefilled.keys, prefilled.values, kept.key_only, load_artifact(tiny_vector_artifact))
    by_hand = tiny_engine.generate(replace(prefilled, values=values), EvictionConfig(), 6, stop_on_eos=False,
                                   kept=merged(kept.indices, kept.key_only), return_logits=True)
    assert gen.token_ids == by_hand.token_ids
    assert torch.equal(gen.logits, by_hand.logits)
    plain = tiny_engine.generate(prefilled, EvictionConfig(), 6, stop_on_eos=False,
                                 kept=merged(kept.indices, kept.key_only), return_logits=True)
    assert not torch.equal(plain.logits, gen.logits)  # the true values would have given other logits


def test_no_packaged_artifact_for_the_tiny_llama_is_refused(tiny_engine, prefilled):
    config = EvictionConfig(scorer="keydiff", budget=0.2, window=8, vector="on")
    with pytest.raises(VectorArtifactError, match="no packaged VECTOR artifact for LlamaForCausalLM"):
        tiny_engine.generate(prefilled, config, 2)


def test_smollm2_finds_its_packaged_artifact_by_default(smollm2_dir, one_torch_thread):
    from vllm_kvevict.evaluation.tasks import make_task
    from vllm_kvevict.reference.engine import ReferenceEngine

    engine = ReferenceEngine(smollm2_dir)
    task = make_task("niah_single", engine.tokenizer, 400, seed=5)
    prefilled = engine.prefill(task.prompt_ids)
    plain = engine.generate(prefilled, EvictionConfig(scorer="keydiff", budget=0.25), 8)
    gen = engine.generate(prefilled, EvictionConfig(scorer="keydiff", budget=0.25, vector="on"), 8)
    assert gen.memory_fraction == pytest.approx(plain.memory_fraction)
    assert sum(idx.numel() for row in gen.key_only for idx in row) > 0
