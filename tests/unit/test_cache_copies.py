"""Every layer's copies at once (``plan_copies``) against the per-layer ``copy_indices``, and the
compaction that copies whole pages as pages against the entry-by-entry one, bit for bit."""

from __future__ import annotations

import pytest
import torch
from test_cache_key_only_pages import vector_kept
from test_vllm_layouts import BS, HKV, LAYOUTS

from vllm_kvevict.cache import copy_indices, plan_compaction
from vllm_kvevict.cache.copies import plan_copies
from vllm_kvevict.policies import KeptSet

NB = 128
FIELDS = ("src_block", "head", "src_slot", "dst_block", "dst_plane", "dst_slot")


def _runs_kept(length: int, block_size: int, heads: int, layers: int, seed: int, most: int) -> KeptSet:
    """Whole block-aligned runs per head (head_selection page), unequal counts, the last run of
    the prompt partial when ``length`` is not a multiple of ``block_size``; at most ``most`` runs a head."""
    gen = torch.Generator().manual_seed(seed)
    runs = -(-length // block_size)
    indices = []
    for _ in range(layers):
        row = []
        for _ in range(heads):
            kept_runs = torch.randperm(runs, generator=gen)[: int(torch.randint(1, most + 1, (1,), generator=gen))]
            tokens = (kept_runs.sort().values.view(-1, 1) * block_size + torch.arange(block_size)).flatten()
            row.append(tokens[tokens < length])
        indices.append(row)
    return KeptSet(indices=indices, head_budgets=torch.tensor([[len(t) for t in r] for r in indices]), scores=[])


def _tokens_kept(length: int, heads: int, layers: int, seed: int) -> KeptSet:
    gen = torch.Generator().manual_seed(seed)
    indices = [[torch.randperm(length, generator=gen)[: int(torch.randint(1, length // 2, (1,), generator=gen))]
                .sort().values for _ in range(heads)] for _ in range(layers)]
    return KeptSet(indices=indices, head_budgets=torch.tensor([[len(t) for t in r] for r in indices]), scores=[])


def _perm(n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(n))


CASES = {  # name -> (kept, block size, KV heads, compact blocks, positional block table)
    "runs-bs32-hkv3": lambda: (_runs_kept(2048, 32, 3, 4, 0, 12), 32, 3, list(range(3, 15)), torch.arange(64) + 20),
    "runs-partial-bs16-hkv2": lambda: (_runs_kept(203, 16, 2, 3, 1, 13), 16, 2, [40, 2, 41, 3, 42, 4, 43, 5, 44, 6, 45,
                                                                         1, 46], _perm(13) + 7),
    "tokens-bs4-hkv3": lambda: (_tokens_kept(61, 3, 3, 2), 4, 3, list(range(16, 32)), _perm(16)),
    "vector-bs32-hkv2": lambda: (vector_kept(300, 3), BS, HKV, list(range(40, 52)), torch.arange(10)),
}


def _equal(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in FIELDS)


@pytest.mark.parametrize("name", CASES)
def test_every_layer_at_once_equals_each_layer_on_its_own(name):
    kept, bs, hkv, blocks, table = CASES[name]()
    plan = plan_compaction(kept, blocks, bs, hkv)
    copies = plan_copies(plan, table, NB, hkv, bs)
    for layer in range(plan.num_layers):
        assert _equal(copies.layer(layer), copy_indices(plan.layer_gather(layer), table, NB, hkv, bs))
        if plan.key_only is None:
            assert copies.key_only_layer(layer) is None
        else:
            want = copy_indices(plan.key_only.layer_gather(layer), table, NB, hkv, bs)
            assert _equal(copies.key_only_layer(layer), want)
        # the split: whole pages (every slot, slot to slot) and the rest are the layer's entries
        split = copies.layer_copies(layer)
        pages = split.pages
        slot = torch.arange(bs).repeat(pages.src_block.numel())
        each = [t.repeat_interleave(bs) for t in (pages.src_block, pages.src_plane, pages.dst_block, pages.dst_plane)]
        as_entries = torch.stack([each[0], each[1], slot, each[2], each[3], slot], 1)
        rest = torch.stack([getattr(split.entries, f) for f in FIELDS], 1)
        every = torch.stack([getattr(copies.layer(layer), f) for f in FIELDS], 1)
        got = sorted(map(tuple, torch.cat([as_entries, rest]).tolist()))
        assert got == sorted(map(tuple, every.tolist()))
        if name.startswith("runs"):
            assert rest.shape[0] < bs * hkv  # only the prompt's partial last run, per head, is entry by entry


def test_whole_runs_become_page_copies_and_single_tokens_stay_entries():
    kept, bs, hkv, blocks, table = CASES["runs-bs32-hkv3"]()
    copies = plan_copies(plan_compaction(kept, blocks, bs, hkv), table, NB, hkv, bs)
    assert copies.entries.src_block.numel() == 0 and copies.pages.src_block.numel() * bs == int(kept.head_budgets.sum())
    kept, bs, hkv, blocks, table = CASES["runs-partial-bs16-hkv2"]()
    copies = plan_copies(plan_compaction(kept, blocks, bs, hkv), table, NB, hkv, bs)
    assert copies.entries.src_block.numel() <= 3 * hkv * (203 % 16)  # partial last runs only
    kept, bs, hkv, blocks, table = CASES["vector-bs32-hkv2"]()
    copies = plan_copies(plan_compaction(kept, blocks, bs, hkv), table, NB, hkv, bs)
    assert copies.pages.src_block.numel() == 0  # random single tokens never fill a page slot for slot


def test_every_check_of_copy_indices_is_made_per_layer():
    kept, bs, hkv, _, table = CASES["tokens-bs4-hkv3"]()
    source = int(table[int(kept.indices[0][0][0]) // bs])  # a source block of layer 0
    plan = plan_compaction(kept, [source, 40, 41, 42, 43, 44], bs, hkv)
    with pytest.raises(ValueError, match="source block"):
        plan_copies(plan, table, NB, hkv, bs)
    plan = plan_compaction(kept, list(range(16, 32)), bs, hkv)
    with pytest.raises(ValueError, match="past the block table"):
        plan_copies(plan, table[:3], 64, hkv, bs)
    with pytest.raises(ValueError, match="out of range"):
        plan_copies(plan, table, 20, hkv, bs)
    # a block that one layer writes and only another layer reads is no conflict: each layer is its
    # own cache. Layer 0 keeps 5 tokens per head (2 pages: planes of blocks 30 then 9), layer 1
    # two tokens (1 page, block 30) read from block 9.
    two = KeptSet(indices=[[torch.arange(5)] * hkv, [torch.tensor([8, 9])] * hkv],
                  head_budgets=torch.tensor([[5] * hkv, [2] * hkv]), scores=[])
    plan = plan_compaction(two, [30, 9], bs, hkv)
    table = torch.tensor([5, 6, 9])
    copies = plan_copies(plan, table, NB, hkv, bs)
    assert set(copies.layer(0).dst_block.tolist()) == {30, 9} and copies.layer(1).src_block.unique().tolist() == [9]
    plan = plan_compaction(two, [9, 30], bs, hkv)  # now layer 1 writes block 9 too
    with pytest.raises(ValueError, match="source block"):
        plan_copies(plan, table, NB, hkv, bs)


def test_key_only_entries_that_are_not_pairs_are_refused():
    kept, bs, hkv, blocks, table = CASES["vector-bs32-hkv2"]()
    plan = plan_compaction(kept, blocks, bs, hkv)
    plan.key_only.half = plan.key_only.half.flip(0)
    with pytest.raises(ValueError, match="pairs"):
        plan_copies(plan, table, NB, hkv, bs)


@pytest.mark.parametrize("make", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("length", [96, 203])
def test_page_copies_leave_the_cache_bit_for_bit_as_entry_copies(make, length):
    """The whole cache (every slot, written or not) after the compaction equals the one the
    entry-by-entry copy of the same list leaves."""
    torch.manual_seed(length)
    keys, values = torch.randn(length, HKV, 64), torch.randn(length, HKV, 64)
    table = torch.randperm(20)[: -(-length // BS)] + 30
    kv, layout = make(keys, values, table, num_blocks=64)
    kv.copy_(torch.randn(kv.shape))  # every slot its own bits, compact blocks included
    kept = _runs_kept(length, BS, HKV, 3, length, 4)
    plan = plan_compaction(kept, [2, 5, 3, 60, 7, 8], BS, HKV)
    want = kv.clone()
    for layer in range(plan.num_layers):
        c = copy_indices(plan.layer_gather(layer), table, 64, HKV, BS)
        k, v = layout.read(want, c.src_block, c.head, c.src_slot)
        layout.write(want, c.dst_block, c.dst_plane, c.dst_slot, k, v)
    copies = layout.plan_copies(kv, table, plan)
    assert copies.pages.src_block.numel() > 0
    for layer in range(plan.num_layers):
        layout.compact(kv, table, plan, layer, copies)
    assert torch.equal(kv.contiguous().view(torch.int32), want.contiguous().view(torch.int32))
