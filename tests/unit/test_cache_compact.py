"""Compaction round trip on real kept sets: K from the budget alone suffices, and the compact
region read back equals each head's kept keys and values exactly."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_kvevict.cache import (
    compact_blocks_needed,
    compact_layer,
    gather_compact,
    kept_positions_tensor,
    layer_budget_bounds,
    page_table_tensor,
    plan_compaction,
)
from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies import compute_kept
from vllm_kvevict.policies.base import LayerInputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # one torch thread: see conftest

NUM_LAYERS, GROUP, DIM, LENGTH, WINDOW, HIDDEN = 4, 2, 8, 301, 4, 24

POLICIES = {
    "snapkv+adakv": dict(scorer="snapkv", budget=0.2),
    "snapkv+adakv_floor": dict(scorer="snapkv", allocation="adakv_floor", budget=0.2),
    "criticalkv": dict(scorer="criticalkv", budget=0.2),
    "criticalkv+global": dict(scorer="criticalkv", allocation="global", budget=0.2),
    "defensivekv": dict(scorer="defensivekv", budget=40),
    "defensivekv+global": dict(scorer="defensivekv", allocation="global", budget=0.1),
    "pyramidkv": dict(scorer="pyramidkv", budget=0.3),
    "laprox": dict(scorer="laprox", budget=0.15),
    "streamingllm": dict(scorer="streamingllm", budget=0.1, sinks=2, granularity="head"),
}


def random_layers(num_kv_heads: int, seed: int) -> list[LayerInputs]:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    heads = num_kv_heads * GROUP
    layers = []
    for layer in range(NUM_LAYERS):
        angles = randn(16, DIM // 2).repeat(1, 2)
        layers.append(LayerInputs(
            # a few loud keys per head make the heads' scores (and so their budgets) differ
            keys=randn(num_kv_heads, LENGTH, DIM) * (1 + 3 * torch.rand(num_kv_heads, LENGTH, 1, generator=generator) ** 8),
            values=randn(num_kv_heads, LENGTH, DIM),
            queries=randn(heads, WINDOW, DIM),
            o_proj=randn(HIDDEN, heads * DIM),
            layer_idx=layer,
            num_layers=NUM_LAYERS,
            queries_pre_rope=randn(heads, LENGTH, DIM),
            rope_cos=angles.cos(),
            rope_sin=angles.sin(),
            attention_sum=randn(heads, LENGTH).abs(),
        ))
    return layers


def paged(tensor: torch.Tensor, block_table: torch.Tensor, num_blocks: int, block_size: int, generator) -> torch.Tensor:
    """``[num_blocks, Hkv, bs, d]`` random cache with ``tensor [Hkv, L, d]`` written by position."""
    num_kv_heads, length, dim = tensor.shape
    cache = torch.randn(num_blocks, num_kv_heads, block_size, dim, generator=generator)
    pos = torch.arange(length)
    cache[block_table[pos // block_size], :, pos % block_size] = tensor.transpose(0, 1)
    return cache


@pytest.fixture(scope="module")
def kept_sets():
    """``(policy, Hkv) -> (config, layers, kept)`` computed once per module."""
    cache = {}

    def get(policy: str, num_kv_heads: int):
        key = (policy, num_kv_heads)
        if key not in cache:
            # single tokens per head: the compaction of partly filled head-pages (whole pages per
            # head are covered in test_policies_head_pages.py)
            config = EvictionConfig(window=WINDOW, head_selection="token", **POLICIES[policy])
            layers = random_layers(num_kv_heads, seed=len(cache))
            cache[key] = (config, layers, compute_kept(layers, config))
        return cache[key]

    return get


@pytest.mark.parametrize("num_kv_heads", [1, 2, 3, 8])
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_compaction_round_trip_with_k_from_the_budget(kept_sets, policy, num_kv_heads):
    config, layers, kept = kept_sets(policy, num_kv_heads)
    bounds = layer_budget_bounds(config, LENGTH, NUM_LAYERS)
    for layer, bound in enumerate(bounds):
        assert int(kept.head_budgets[layer].sum()) <= num_kv_heads * bound.mean
        assert int(kept.head_budgets[layer].max()) <= bound.head_max
    generator = torch.Generator().manual_seed(num_kv_heads)
    for block_size in (16, 32, 128):
        k = compact_blocks_needed(config, LENGTH, block_size, NUM_LAYERS, num_kv_heads)
        needed = max(math.ceil(sum(math.ceil(int(b) / block_size) for b in row) / num_kv_heads) for row in kept.head_budgets)
        assert k >= needed
        prompt_blocks = math.ceil(LENGTH / block_size)
        num_blocks = prompt_blocks + k + 3
        ids = torch.randperm(num_blocks, generator=generator)
        block_table, compact_blocks = ids[:prompt_blocks], ids[prompt_blocks : prompt_blocks + k].tolist()
        plan = plan_compaction(kept, compact_blocks, block_size, num_kv_heads)  # raises if it did not fit
        pages, lens = page_table_tensor(plan)
        for layer, inputs in enumerate(layers):
            k_cache = paged(inputs.keys, block_table, num_blocks, block_size, generator)
            v_cache = paged(inputs.values, block_table, num_blocks, block_size, generator)
            k_before, v_before = k_cache.clone(), v_cache.clone()
            compact_layer(k_cache, v_cache, block_table, plan, layer, impl="torch")
            got_k = gather_compact(k_cache, pages[layer], lens[layer])
            got_v = gather_compact(v_cache, pages[layer], lens[layer])
            for g in range(num_kv_heads):
                idx = kept.indices[layer][g]
                assert torch.equal(got_k[g], inputs.keys[g, idx])
                assert torch.equal(got_v[g], inputs.values[g, idx])
            # nothing but the written (head-page, slot)s changed: the positional blocks are intact
            gather = plan.layer_gather(layer)
            written = torch.zeros(k_cache.shape[:3], dtype=torch.bool)
            written[gather.dst_page // num_kv_heads, gather.dst_page % num_kv_heads, gather.dst_slot] = True
            assert torch.equal(k_cache[~written], k_before[~written])
            assert torch.equal(v_cache[~written], v_before[~written])


def test_the_checked_copy_runs_the_kernels_torch_reference(kept_sets):
    """compact_layer is the kernel's torch reference driven by the plan's padded tensors."""
    compaction = pytest.importorskip("vllm_kvevict.kernels.compaction")
    config, layers, kept = kept_sets("criticalkv", 3)
    block_size, num_kv_heads = 16, 3
    k = compact_blocks_needed(config, LENGTH, block_size, NUM_LAYERS, num_kv_heads)
    prompt_blocks = math.ceil(LENGTH / block_size)
    generator = torch.Generator().manual_seed(5)
    ids = torch.randperm(prompt_blocks + k + 2, generator=generator)
    block_table, compact_blocks = ids[:prompt_blocks], ids[prompt_blocks : prompt_blocks + k].tolist()
    plan = plan_compaction(kept, compact_blocks, block_size, num_kv_heads)
    pages, lens = page_table_tensor(plan)
    positions = kept_positions_tensor(plan)
    for layer, inputs in enumerate(layers):
        k_ref = paged(inputs.keys, block_table, ids.numel(), block_size, generator)
        v_ref = paged(inputs.values, block_table, ids.numel(), block_size, generator)
        k_ker, v_ker = k_ref.clone(), v_ref.clone()
        compact_layer(k_ref, v_ref, block_table, plan, layer, impl="torch")
        compaction.torch_compact(k_ker, v_ker, block_table[None], positions[layer][None], lens[layer][None], pages[layer][None])
        assert torch.equal(k_ref, k_ker) and torch.equal(v_ref, v_ker)


def test_compaction_refuses_to_overwrite_a_source_block(kept_sets):
    config, layers, kept = kept_sets("snapkv+adakv", 2)
    block_size = 32
    k = compact_blocks_needed(config, LENGTH, block_size, NUM_LAYERS, 2)
    prompt_blocks = math.ceil(LENGTH / block_size)
    block_table = torch.arange(prompt_blocks)
    plan = plan_compaction(kept, list(range(prompt_blocks - 1, prompt_blocks - 1 + k)), block_size, 2)
    cache = torch.zeros(prompt_blocks + k, 2, block_size, DIM)
    with pytest.raises(ValueError, match="source block"):
        compact_layer(cache, cache.clone(), block_table, plan, 0)
    with pytest.raises(ValueError, match="past the block table"):
        compact_layer(cache, cache.clone(), block_table[:2], plan, 0)
