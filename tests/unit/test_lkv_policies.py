"""The ``lkv`` scorer and allocation inside the policies API, on random layers and a random artifact."""

from __future__ import annotations

import pytest
import torch
from lkv_fakes import fake_config, random_artifact, rope_inv_freq

from vllm_kvevict.cache import compact_blocks_needed
from vllm_kvevict.config import EvictionConfig, EvictionConfigError
from vllm_kvevict.lkv.artifact import LKVArtifactError, load_artifact
from vllm_kvevict.lkv.identity import ModelIdentity
from vllm_kvevict.lkv.nets import unrotate_keys
from vllm_kvevict.policies import ALLOCATORS, SCORERS, LayerInputs, LayerScores, Needs, build_policy, compute_kept
from vllm_kvevict.policies.allocators.lkv import split_by_shares
from vllm_kvevict.reference.model_parts import apply_rope

NUM_LAYERS, HKV, GROUP, DIM, LENGTH, WINDOW = 3, 2, 2, 8, 200, 8
IDENTITY = ModelIdentity.from_hf_config(fake_config(NUM_LAYERS, HKV * GROUP, HKV, DIM))


@pytest.fixture(scope="module")
def artifact_path(tmp_path_factory):
    return random_artifact(tmp_path_factory.mktemp("lkv") / "fake.safetensors", IDENTITY, seed=3)


@pytest.fixture(scope="module")
def layers() -> list[LayerInputs]:
    """Random layers with everything any scorer reads."""
    generator = torch.Generator().manual_seed(5)

    def rand(*shape):
        return torch.rand(*shape, generator=generator) * 2 - 1

    heads = HKV * GROUP
    angles = rand(16, DIM // 2).repeat(1, 2)
    return [
        LayerInputs(keys=rand(HKV, LENGTH, DIM), values=rand(HKV, LENGTH, DIM), queries=rand(heads, WINDOW, DIM),
                    o_proj=rand(16, heads * DIM), positions=torch.arange(LENGTH), layer_idx=layer,
                    num_layers=NUM_LAYERS, queries_pre_rope=rand(heads, LENGTH, DIM), rope_cos=angles.cos(),
                    rope_sin=angles.sin(), attention_sum=rand(heads, LENGTH).abs())
        for layer in range(NUM_LAYERS)
    ]


def config(artifact_path, scorer="lkv", allocation=None, budget=0.2, **extra) -> EvictionConfig:
    return EvictionConfig(scorer=scorer, allocation=allocation, budget=budget, min_tokens=0, window=WINDOW,
                          lkv_artifact=str(artifact_path), **extra)


def test_split_by_shares_gives_floors_then_shares_and_fills_capped_heads_elsewhere():
    budgets = split_by_shares(torch.tensor([0.5, 0.3, 0.2]), torch.tensor([4, 4, 4]), 64, 100)
    assert budgets.tolist() == [30, 20, 14] and int(budgets.sum()) == 64
    capped = split_by_shares(torch.tensor([0.9, 0.05, 0.05]), torch.tensor([2, 2, 2]), 150, 60)
    assert capped.tolist() == [60, 45, 45]
    assert split_by_shares(torch.tensor([1.0, 0.0]), torch.tensor([7, 9]), 16, 50).tolist() == [7, 9]
    with pytest.raises(ValueError, match="cannot split"):
        split_by_shares(torch.tensor([0.5, 0.5]), torch.tensor([9, 9]), 16, 50)


def test_lkv_scorer_reads_keys_and_values_only(artifact_path):
    assert build_policy(config(artifact_path), 16, model=IDENTITY).needs == Needs()


def test_lkv_scores_are_the_artifacts_and_window_is_protected(artifact_path, layers):
    policy = build_policy(config(artifact_path, head_selection="token"), 16, model=IDENTITY)
    artifact = load_artifact(artifact_path)
    for layer in layers:
        scores = policy.score_layer(layer)
        expected = artifact.token_scores(layer.layer_idx, layer.keys, layer.values, layer.positions)
        assert torch.equal(scores.values, expected)
        assert scores.protected[:, -WINDOW:].all() and not scores.protected[:, :-WINDOW].any()
        assert torch.equal(scores.head_shares, artifact.head_shares(0.2)[layer.layer_idx])


@pytest.mark.parametrize("scorer", sorted(set(SCORERS)))
@pytest.mark.parametrize("budget", [0.2, 0.45])
def test_lkv_allocation_splits_every_layer_by_the_shares(artifact_path, layers, scorer, budget):
    cfg = config(artifact_path, scorer=scorer, allocation="lkv", budget=budget)
    kept = compute_kept(layers, cfg, model=IDENTITY)
    mean = cfg.budget_tokens(LENGTH)
    shares = load_artifact(artifact_path).head_shares(mean / LENGTH)
    for layer, (indices, budgets, scores) in enumerate(zip(kept.indices, kept.head_budgets, kept.scores)):
        assert int(budgets.sum()) == HKV * mean
        floor = scores.ranked_first.sum(-1)
        assert torch.equal(budgets, split_by_shares(shares[layer], floor, HKV * mean, LENGTH))
        for head, idx in enumerate(indices):
            assert len(idx) == int(budgets[head]) and torch.all(idx[1:] > idx[:-1])
            assert set(range(LENGTH - WINDOW, LENGTH)) <= set(idx.tolist())
            assert_kept_first(scores, head, idx)


@pytest.mark.parametrize("allocation", sorted(set(ALLOCATORS) - {"lkv"}))
def test_lkv_scores_under_every_other_allocation_keep_each_heads_best(artifact_path, layers, allocation):
    cfg = config(artifact_path, allocation=allocation, budget=0.3)
    kept = compute_kept(layers, cfg, model=IDENTITY)
    for indices, budgets, scores in zip(kept.indices, kept.head_budgets, kept.scores):
        assert scores.head_shares is None
        for head, idx in enumerate(indices):
            assert len(idx) == int(budgets[head])
            assert_kept_first(scores, head, idx)
    assert kept.kept_tokens() == NUM_LAYERS * HKV * cfg.budget_tokens(LENGTH) or allocation == "pyramid"


@pytest.mark.parametrize("scorer", ["lkv", "snapkv"])
def test_budget_one_keeps_everything(artifact_path, layers, scorer):
    kept = compute_kept(layers, config(artifact_path, scorer=scorer, allocation="lkv", budget=1.0), model=IDENTITY)
    assert torch.all(kept.head_budgets == LENGTH)


def assert_kept_first(scores: LayerScores, head: int, kept: torch.Tensor) -> None:
    """The head's kept tokens rank before its evicted ones (protected, preferred, then by value)."""
    from vllm_kvevict.policies import rank

    ranks = rank(scores)[head]
    evicted = torch.ones(scores.seq_len, dtype=torch.bool)
    evicted[kept] = False
    if evicted.any():
        assert ranks[kept].max() < ranks[evicted].min()


def test_shares_decide_which_head_keeps_more(artifact_path, layers):
    kept = compute_kept(layers, config(artifact_path, allocation="lkv"), model=IDENTITY)
    shares = load_artifact(artifact_path).head_shares(0.2)
    for budgets, share in zip(kept.head_budgets, shares):
        assert (budgets[0] > budgets[1]) == (share[0] > share[1])


def test_whole_pages_per_head_split_the_layers_pages_by_the_shares(artifact_path, layers):
    cfg = config(artifact_path)  # lkv + lkv: whole pages per head at block size 16 by default
    assert cfg.head_selection_for(16) == "page" and cfg.resolved_granularity == "head"
    policy = build_policy(cfg, 16, model=IDENTITY)
    kept = policy.plan_head([policy.score_layer(layer) for layer in layers], LENGTH)
    pages = compact_blocks_needed(cfg, LENGTH, 16, NUM_LAYERS, HKV)
    for row in kept.indices:
        assert sum(len(idx) for idx in row) <= HKV * pages * 16
        for idx in row:
            pages_kept = torch.unique(idx // 16)
            whole = (pages_kept[:, None] * 16 + torch.arange(16)).flatten()
            assert torch.equal(whole[whole < LENGTH], idx), "a head keeps whole pages"
            assert set(range(LENGTH - WINDOW, LENGTH)) <= set(idx.tolist())
    assert compact_blocks_needed(cfg, LENGTH, 16, NUM_LAYERS, HKV) == compact_blocks_needed(
        cfg.model_copy(update={"allocation": "adakv", "scorer": "snapkv", "lkv_artifact": None}), LENGTH, 16,
        NUM_LAYERS, HKV)


def test_page_granularity_scores_lkv_pages(artifact_path, layers):
    policy = build_policy(config(artifact_path, granularity="page"), 16, model=IDENTITY)
    evicted = policy.evicted_blocks([policy.score_layer(layer) for layer in layers], LENGTH)
    assert 0 < len(evicted) < LENGTH // 16


def test_without_the_model_or_for_another_model_lkv_fails_when_it_first_scores(artifact_path, layers):
    policy = build_policy(config(artifact_path), 16)  # building never fails (the worker learns its model later)
    with pytest.raises(LKVArtifactError, match="needs the model"):
        policy.score_layer(layers[0])
    other = ModelIdentity.from_hf_config(fake_config(NUM_LAYERS, HKV * GROUP, HKV, DIM, vocab_size=7))
    with pytest.raises(LKVArtifactError, match="config_hash"):
        build_policy(config(artifact_path), 16, model=other).score_layer(layers[0])
    resolved = build_policy(config(artifact_path), 16, model=lambda: IDENTITY).score_layer(layers[0])
    assert isinstance(resolved, LayerScores)


def test_the_allocation_without_shares_is_a_clear_error(layers):
    scores = [LayerScores.unprotected(torch.rand(HKV, LENGTH))]
    with pytest.raises(ValueError, match="head_shares"):
        ALLOCATORS["lkv"](scores, 40, EvictionConfig(scorer="snapkv", allocation="lkv", budget=0.2, min_tokens=0))


def test_the_artifact_setting_is_read_only_by_lkv_and_must_exist(artifact_path):
    flat = {"kv_eviction": "snapkv", "kv_budget": 0.2, "kv_min_tokens": 0, "kv_lkv_artifact": str(artifact_path)}
    with pytest.raises(EvictionConfigError) as info:
        EvictionConfig.from_flat(flat)
    assert info.value.field == "kv_lkv_artifact" and "lkv scorer and the lkv allocation" in str(info.value)
    assert EvictionConfig.from_flat({**flat, "kv_allocation": "lkv"}).lkv_artifact == str(artifact_path)
    with pytest.raises(EvictionConfigError) as info:
        EvictionConfig.from_flat({"kv_eviction": "lkv", "kv_lkv_artifact": "/no/such.safetensors"})
    assert info.value.field == "kv_lkv_artifact"
    assert EvictionConfig.from_flat({"kv_eviction": "lkv"}).resolved_allocation == "lkv"
    assert EvictionConfig.from_flat({"kv_eviction": "lkv", "kv_window": 0}).window == 0
    # a request switching to another scorer drops the artifact it no longer reads
    base = EvictionConfig.from_flat({"kv_eviction": "lkv", "kv_lkv_artifact": str(artifact_path)})
    assert EvictionConfig.from_flat({"kv_eviction": "keydiff"}, base=base).lkv_artifact is None


def test_unrotate_inverts_the_models_rope():
    inv_freq = rope_inv_freq(DIM)
    positions = torch.arange(300)
    angles = positions[:, None].float() * inv_freq[None]
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    keys = torch.randn(HKV, 300, DIM, generator=torch.Generator().manual_seed(1))
    rotated = apply_rope(keys, cos, sin)
    assert torch.allclose(unrotate_keys(rotated, positions, inv_freq, 1.0), keys, atol=1e-5)
