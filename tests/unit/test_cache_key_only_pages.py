"""VECTOR's key-only head-pages: planning, packing two keys to a slot, reading them back, and the
torch path's attention over whole + key-only tokens (small tensors, both cache layouts)."""

from __future__ import annotations

import math

import pytest
import torch
from test_vllm_layouts import BS, D, HKV, LAYOUTS

from vllm_kvevict.cache import pack_key_pairs, plan_compaction, unpack_key_pairs
from vllm_kvevict.kernels import masked_attention
from vllm_kvevict.lkv.identity import ModelIdentity
from vllm_kvevict.policies import KeptSet
from vllm_kvevict.reference.key_only import entry_values, routed_values
from vllm_kvevict.vector.artifact import VectorArtifact
from vllm_kvevict.vllm.backends.head_rows import attend_row, read_region_entries
from vllm_kvevict.vllm.step import CompactRegion, HeadRow

LAYERS = 2


def vector_kept(length: int, seed: int) -> KeptSet:
    """Per (layer, head) random disjoint whole and key-only sets (an even number of the latter),
    unequal across heads, ``head_budgets`` counting two key-only tokens as one slot."""
    gen = torch.Generator().manual_seed(seed)
    whole, key_only, budgets = [], [], []
    for _ in range(LAYERS):
        w_row, k_row, b_row = [], [], []
        for _ in range(HKV):
            order = torch.randperm(length, generator=gen)
            n_whole = int(torch.randint(1, length // 4, (1,), generator=gen))
            n_ko = 2 * int(torch.randint(0, length // 6, (1,), generator=gen))
            w_row.append(order[:n_whole].sort().values)
            k_row.append(order[n_whole : n_whole + n_ko].sort().values)
            b_row.append(n_whole + n_ko // 2)
        whole.append(w_row)
        key_only.append(k_row)
        budgets.append(b_row)
    return KeptSet(indices=whole, head_budgets=torch.tensor(budgets), scores=[], key_only=key_only)


def test_pack_pairs_keys_into_halves_and_unpack_gives_them_back():
    keys = torch.arange(12.0).view(6, 2)
    half = torch.tensor([0, 1, 0, 1, 0, 1])
    k_half, v_half = pack_key_pairs(keys, half)
    assert torch.equal(k_half, keys[0::2]) and torch.equal(v_half, keys[1::2])
    slot_k, slot_v = k_half.repeat_interleave(2, 0), v_half.repeat_interleave(2, 0)  # each entry reads its slot
    assert torch.equal(unpack_key_pairs(slot_k, slot_v, half), keys)
    with pytest.raises(ValueError, match="pairs"):
        pack_key_pairs(keys[:5], half[:5])
    with pytest.raises(ValueError, match="pairs"):
        pack_key_pairs(keys, torch.tensor([0, 0, 1, 1, 0, 1]))


@pytest.mark.parametrize("seed", range(4))
def test_plan_places_whole_slots_then_key_only_pairs_in_the_pages_of_the_budget(seed):
    length, block_ids = 300, list(range(40, 52))
    kept = vector_kept(length, seed)
    plan = plan_compaction(kept, block_ids, BS, HKV)
    ko = plan.key_only
    for layer in range(LAYERS):
        pages = plan.head_pages[layer]
        assert [len(p) for p in pages] == [math.ceil(int(b) / BS) for b in kept.head_budgets[layer]]
        whole, pairs = plan.layer_gather(layer), ko.layer_gather(layer)
        for g in range(HKV):
            w = int(plan.lens[layer, g])
            m = whole.head == g
            assert torch.equal(whole.src_positions[m], kept.indices[layer][g])
            segment = [pages[g].index(int(p)) * BS + int(s) for p, s in zip(whole.dst_page[m], whole.dst_slot[m])]
            assert segment == list(range(w))
            m = pairs.head == g
            assert torch.equal(pairs.src_positions[m], kept.key_only[layer][g])
            n = int(m.sum())
            assert int(ko.lens[layer, g]) == n
            ko_slot = [pages[g].index(int(p)) * BS + int(s) for p, s in zip(pairs.dst_page[m], pairs.dst_slot[m])]
            assert ko_slot == [w + j // 2 for j in range(n)] and pairs.half[m].tolist() == [j % 2 for j in range(n)]
        # no (head-page, slot, half) used twice: a whole token fills both halves of its slot
        used = [(int(p), int(s), h) for p, s in zip(whole.dst_page, whole.dst_slot) for h in (0, 1)]
        used += [(int(p), int(s), int(h)) for p, s, h in zip(pairs.dst_page, pairs.dst_slot, pairs.half)]
        assert len(set(used)) == len(used)
    assert torch.equal(plan.slots(), kept.head_budgets)
    plain = KeptSet(indices=[[torch.arange(int(b)) for b in row] for row in kept.head_budgets],
                    head_budgets=kept.head_budgets, scores=[])
    assert plan.pages_used() == plan_compaction(plain, block_ids, BS, HKV).pages_used()  # plain eviction's pages


def test_plan_refuses_odd_key_only_counts_and_slots_off_the_budget():
    kept = vector_kept(200, 0)
    kept.key_only[0][0] = kept.key_only[0][0][:-1] if kept.key_only[0][0].numel() else torch.tensor([199])
    with pytest.raises(ValueError, match="not even"):
        plan_compaction(kept, list(range(40, 52)), BS, HKV)
    kept = vector_kept(200, 1)
    kept.head_budgets[1, 1] += 1
    with pytest.raises(ValueError, match="slots"):
        plan_compaction(kept, list(range(40, 52)), BS, HKV)


def small_artifact(seed: int) -> VectorArtifact:
    g = torch.Generator().manual_seed(seed)
    identity = ModelIdentity("LlamaForCausalLM", LAYERS, HKV * 3, HKV, D, "test")
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    derotate = torch.tensor([[True, False], [False, True]])
    weight = torch.randn(LAYERS, HKV, D + 1, D, generator=g) / math.sqrt(D)
    return VectorArtifact(identity, weight, derotate, torch.rand(LAYERS, HKV, 2, generator=g), inv_freq)


def positional(make, length: int, seed: int):
    """``(kv_cache, layout, keys, values)``: per layer ``[Hkv, length, d]`` entries written at
    positions ``0 .. length - 1`` of blocks ``0, 1, ...`` (one cache per layer)."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.arange(math.ceil(length / BS), dtype=torch.int32)
    keys = [torch.randn(length, HKV, D, generator=gen) for _ in range(LAYERS)]
    values = [torch.randn(length, HKV, D, generator=gen) for _ in range(LAYERS)]
    caches = [make(k, v, table, 64) for k, v in zip(keys, values)]
    return caches, table, [k.transpose(0, 1) for k in keys], [v.transpose(0, 1) for v in values]


@pytest.mark.parametrize("make", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_compaction_packs_keys_two_to_a_slot_and_the_region_reads_them_back(make):
    length = 200
    caches, table, keys, values = positional(make, length, seed=3)
    kept = vector_kept(length, seed=5)
    plan = plan_compaction(kept, list(range(40, 52)), BS, HKV)
    artifact = small_artifact(7)
    region = CompactRegion.from_plan(plan, length, artifact)
    for layer, (kv, layout) in enumerate(caches):
        layout.compact(kv, table, plan, layer)
        ko = region.key_only
        k_half, v_half = layout.read(kv, ko.block[layer], ko.plane[layer], ko.slot[layer])
        heads = ko.heads(layer)
        want = keys[layer][heads, ko.positions[layer]]
        assert torch.equal(torch.where(ko.half[layer][:, None] == 0, k_half, v_half), want)  # V halves hold keys
        got_k, got_v, lens = read_region_entries(region, layer, kv, layout)
        assert torch.equal(lens, plan.lens[layer] + ko.lens[layer])
        rebuilt = routed_values(keys, values, kept.key_only, artifact)[layer]
        start = 0
        for g in range(HKV):
            w, k = kept.indices[layer][g], kept.key_only[layer][g]
            n = w.numel() + k.numel()
            assert torch.equal(got_k[start : start + n], torch.cat([keys[layer][g, w], keys[layer][g, k]]))
            assert torch.equal(got_v[start : start + w.numel()], values[layer][g, w])
            torch.testing.assert_close(got_v[start + w.numel() : start + n], rebuilt[g, k], rtol=1e-5, atol=1e-5)
            start += n


def test_entry_values_are_routed_values_entry_by_entry():
    artifact = small_artifact(2)
    gen = torch.Generator().manual_seed(4)
    keys = [torch.randn(HKV, 50, D, generator=gen) for _ in range(LAYERS)]
    key_only = [[torch.tensor([3, 7, 20, 41]), torch.tensor([0, 49])] for _ in range(LAYERS)]
    routed = routed_values(keys, [torch.zeros(HKV, 50, D)] * LAYERS, key_only, artifact)
    for layer in range(LAYERS):
        heads = torch.tensor([0, 0, 0, 0, 1, 1])
        positions = torch.cat(key_only[layer])
        got = entry_values(artifact, layer, keys[layer][heads, positions], heads, positions)
        torch.testing.assert_close(got, routed[layer][heads, positions], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, entry_values(small_artifact(3), layer, keys[layer][heads, positions], heads,
                                                    positions))


@pytest.mark.parametrize("make", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_decode_over_key_only_pages_equals_attention_over_the_rebuilt_dense_cache(make):
    """The torch path of a compacted row (region with key-only pairs + a 3-token tail) equals
    masked attention over the dense kept tokens whose key-only values were rebuilt."""
    length, prompt = 200, 197
    caches, table, keys, values = positional(make, length, seed=8)
    kept = vector_kept(prompt, seed=9)
    plan = plan_compaction(kept, list(range(40, 52)), BS, HKV)
    artifact = small_artifact(1)
    region = CompactRegion.from_plan(plan, prompt, artifact)
    rebuilt = routed_values(keys, values, kept.key_only, artifact)
    gen = torch.Generator().manual_seed(10)
    queries = torch.randn(2, HKV * 3, D, generator=gen)
    seq_len = length - 1
    row = HeadRow("r", region, 0, 2, seq_len, table[region.first_tail_block :])
    for layer, (kv, layout) in enumerate(caches):
        layout.compact(kv, table, plan, layer)
        got = attend_row(row, layer, queries, kv, layout, scale=0.125)
        tail = torch.arange(prompt, seq_len)
        dense_k, dense_v, valid = [], [], []
        for g in range(HKV):
            w, k = kept.indices[layer][g], kept.key_only[layer][g]
            dense_k.append(torch.cat([keys[layer][g, w], keys[layer][g, k], keys[layer][g, tail]]))
            dense_v.append(torch.cat([values[layer][g, w], rebuilt[layer][g, k], values[layer][g, tail]]))
        width = max(x.shape[0] for x in dense_k)
        pad = [torch.cat([x, torch.zeros(width - x.shape[0], D)]) for x in dense_k]
        pad_v = [torch.cat([x, torch.zeros(width - x.shape[0], D)]) for x in dense_v]
        for qi, qpos in enumerate((seq_len - 2, seq_len - 1)):
            mask = []
            for g in range(HKV):
                n = kept.indices[layer][g].numel() + kept.key_only[layer][g].numel()
                m = torch.zeros(width, dtype=torch.bool)
                m[:n] = True
                m[n : n + tail.numel()] = tail <= qpos
                mask.append(m)
            mask_t = torch.stack(mask)
            want = masked_attention(queries[qi].view(1, 1, HKV, 3, D), torch.stack(pad)[None], torch.stack(pad_v)[None],
                                    mask_t[None, None], 0.125).reshape(HKV * 3, D)
            torch.testing.assert_close(got[qi], want, rtol=1e-4, atol=1e-5)


def test_regions_with_key_only_pairs_are_left_to_the_torch_path():
    """Whole-page regions map to vLLM's op on single-head pages; the same with key-only pairs
    after them must not (the op would attend the whole tokens only)."""
    from vllm_kvevict.vllm.backends.cpu_head_pages import region_pages

    prompt, blocks = 4 * BS, list(range(40, 52))
    whole = [[torch.arange(0, 2 * BS) for _ in range(HKV)] for _ in range(LAYERS)]
    pairs = [[torch.tensor([2 * BS + 5, 3 * BS + 1]) for _ in range(HKV)] for _ in range(LAYERS)]
    plain = KeptSet(indices=whole, head_budgets=torch.full((LAYERS, HKV), 2 * BS), scores=[])
    assert region_pages(CompactRegion.from_plan(plan_compaction(plain, blocks, BS, HKV), prompt), HKV, BS) is not None
    vector = KeptSet(indices=whole, head_budgets=torch.full((LAYERS, HKV), 2 * BS + 1), scores=[], key_only=pairs)
    region = CompactRegion.from_plan(plan_compaction(vector, blocks, BS, HKV), prompt, small_artifact(0))
    assert region_pages(region, HKV, BS) is None
    with pytest.raises(ValueError, match="artifact"):
        CompactRegion.from_plan(plan_compaction(vector, blocks, BS, HKV), prompt)


def test_the_paged_check_path_attends_key_only_rows_on_the_packed_cpu_cache_as_the_torch_path():
    """``KVEVICT_CPU_HEAD_DECODE=paged``'s path (vLLM-CPU's packed cache unpacked into the GPU
    layout, then the GPU head-row code: the Triton kernel interpreted) reads the key-only pairs
    vLLM's op packed into K and V halves, and gives the torch path's output."""
    pytest.importorskip("triton")
    from vllm_kvevict.vllm.backends.head_batch import HeadRowBuffers
    from vllm_kvevict.vllm.backends.head_rows import attend_head_rows
    from vllm_kvevict.vllm.backends.head_rows_paged import attend_head_rows_paged
    from vllm_kvevict.vllm.step import EvictionStep

    length, prompt = 200, 197
    caches, table, _, _ = positional(LAYOUTS["cpu"], length, seed=11)
    kept = vector_kept(prompt, seed=12)
    plan = plan_compaction(kept, list(range(40, 52)), BS, HKV)
    region = CompactRegion.from_plan(plan, prompt, small_artifact(4))
    step = EvictionStep(observe={}, head_rows={1: HeadRow("r", region, 1, 2, length - 1,
                                                          table[region.first_tail_block :])},
                        table_rows={}, model=None)
    query = torch.randn(4, HKV * 3 * D, generator=torch.Generator().manual_seed(13))
    buffers = HeadRowBuffers(torch.device("cpu"))
    for layer, (kv, layout) in enumerate(caches):
        layout.compact(kv, table, plan, layer)
        want, got = torch.zeros(4, HKV * 3 * D), torch.zeros(4, HKV * 3 * D)
        assert not attend_head_rows(step, layer, query, kv, layout, want, HKV * 3, 0.125)
        attend_head_rows_paged(buffers, step, layer, query, kv, layout, got, HKV * 3, 0.125)
        torch.testing.assert_close(got[1:3], want[1:3], rtol=2e-4, atol=2e-5)
        assert bool((got[0] == 0).all()) and bool((got[3] == 0).all())
