"""VECTOR's key-only tokens in the GPU head-row path (``backends/head_batch.py``), on CPU tensors
in the GPU cache layout.

* the page table and key-only counts / positions read back from a ``CompactRegion`` built by the
  real plan (``plan_compaction``, ``CompactRegion.from_plan``) are the plan's, the pages covering
  the key-only slots (a head whose whole tokens end on a page boundary has a page of key-only
  pairs only); a region off the kernel's slot convention is refused;
* :func:`decode_head_rows` over VECTOR rows (two artifacts: two kernel calls), plain rows and a
  row of three queries equals the CPU torch path (:func:`head_rows.attend_row`, which rebuilds
  the values with the reference's own function) for the Triton kernel (interpreted) and its torch
  reference, and differs from it when the key-only segment is dropped.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from vllm_kvevict.cache import page_table_tensor, plan_compaction
from vllm_kvevict.lkv.identity import ModelIdentity
from vllm_kvevict.policies import KeptSet
from vllm_kvevict.vector.artifact import VectorArtifact
from vllm_kvevict.vllm.backends.head_batch import (
    HeadRowBuffers,
    artifact_groups,
    decode_head_rows,
    region_key_only,
    region_page_table,
)
from vllm_kvevict.vllm.backends.head_rows import attend_row
from vllm_kvevict.vllm.layouts import SplitHeadDimLayout
from vllm_kvevict.vllm.step import CompactRegion, EvictionStep, HeadRow

BS, HKV, G, D, LAYERS = 16, 2, 2, 32, 2


def artifact(seed: int) -> VectorArtifact:
    gen = torch.Generator().manual_seed(seed)
    identity = ModelIdentity("LlamaForCausalLM", LAYERS, HKV * G, HKV, D, "gpu-key-only-test")
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    weight = torch.randn(LAYERS, HKV, D + 1, D, generator=gen) / math.sqrt(D)
    derotate = torch.tensor([[True, False], [False, True]])
    return VectorArtifact(identity, weight, derotate, torch.rand(LAYERS, HKV, 2, generator=gen), inv_freq)


def vector_kept(length: int, counts: list[list[tuple[int, int]]], gen: torch.Generator) -> KeptSet:
    """``counts[l][g] = (whole, key_only)``: random disjoint position sets of those sizes."""
    whole, key_only = [], []
    for layer_counts in counts:
        w_row, k_row = [], []
        for n_whole, n_ko in layer_counts:
            order = torch.randperm(length, generator=gen)
            w_row.append(order[:n_whole].sort().values)
            k_row.append(order[n_whole : n_whole + n_ko].sort().values)
        whole.append(w_row)
        key_only.append(k_row)
    budgets = torch.tensor([[w + k // 2 for w, k in layer] for layer in counts])
    return KeptSet(indices=whole, head_budgets=budgets, scores=[], key_only=key_only)


#: layer 0: head 0's 32 whole tokens end on a page boundary, its 5 pairs fill a page of their own;
#: head 1's 15 pairs run from mid-page 1 into page 2. Layer 1: head 0 holds no key-only token.
COUNTS = [[(32, 10), (20, 30)], [(7, 0), (3, 50)]]


def compacted(gen, cache, layout, prompt_len: int, seq_len: int, compact: list[int], first_block: int,
              counts, art):
    """Random K/V at positions ``0 .. seq_len - 1`` of blocks ``first_block ..``, the prompt
    compacted into ``compact``: ``(blocks, plan, region)``; ``counts=None``: a plain kept set."""
    blocks = torch.arange(first_block, first_block + -(-seq_len // BS))
    pos = torch.arange(seq_len)
    for layer in range(LAYERS):
        cache[layer][blocks[pos // BS], :, pos % BS] = torch.randn(seq_len, HKV, 2 * D, generator=gen)
    if counts is None:
        kept = vector_kept(prompt_len, [[(n, 0) for n in (21, 9)]] * LAYERS, gen)
        kept = dataclasses.replace(kept, key_only=None)
    else:
        kept = vector_kept(prompt_len, counts, gen)
    plan = plan_compaction(kept, compact, BS, HKV)
    copies = layout.plan_copies(cache[0], blocks, plan)
    for layer in range(LAYERS):
        layout.compact(cache[layer], blocks, plan, layer, copies)
    return blocks, plan, CompactRegion.from_plan(plan, prompt_len, art if counts is not None else None)


def empty_caches(blocks: int) -> list[torch.Tensor]:
    """GPU-layout caches in NHD memory; NaN where nothing was written (a stray read shows)."""
    return [torch.full((blocks, BS, HKV, 2 * D), float("nan")).permute(0, 2, 1, 3) for _ in range(LAYERS)]


def test_tables_of_a_planned_region_cover_its_key_only_slots_and_give_its_positions(seed):
    gen = torch.Generator().manual_seed(seed)
    layout = SplitHeadDimLayout(HKV, BS, D)
    cache = empty_caches(64)
    _, plan, region = compacted(gen, cache, layout, 150, 160, list(range(40, 46)), 1, COUNTS, artifact(0))
    pages, lens = region_page_table(region, HKV, BS)
    want_pages, want_lens = page_table_tensor(plan)
    assert torch.equal(lens, want_lens)  # the whole tokens: the kernel's compact_lens
    slots = plan.slots()
    assert pages.shape[-1] == max(math.ceil(int(s) / BS) for s in slots.flatten())
    for layer in range(LAYERS):
        for g in range(HKV):
            n = math.ceil(int(slots[layer, g]) / BS)
            assert n == len(plan.head_pages[layer][g])
            assert torch.equal(pages[layer, g, :n], want_pages[layer, g, :n]), (layer, g)
    assert math.ceil(32 / BS) == 2 and int(slots[0, 0]) == 37  # head 0's third page holds pairs only
    ko_lens, positions = region_key_only(region, HKV)
    assert torch.equal(ko_lens, plan.key_only.lens.to(torch.int32))
    for layer in range(LAYERS):
        gather = plan.key_only.layer_gather(layer)
        for g in range(HKV):
            n = int(ko_lens[layer, g])
            assert torch.equal(positions[layer, g, :n].long(), gather.src_positions[gather.head == g])
    plain = dataclasses.replace(region, key_only=None)
    assert not bool(region_key_only(plain, HKV)[0].any())


def test_a_region_off_the_kernels_slot_convention_is_refused(seed):
    gen = torch.Generator().manual_seed(seed)
    layout = SplitHeadDimLayout(HKV, BS, D)
    cache = empty_caches(64)
    _, _, region = compacted(gen, cache, layout, 150, 160, list(range(40, 46)), 1, COUNTS, artifact(0))
    ko = region.key_only
    swapped = dataclasses.replace(ko, half=[1 - h for h in ko.half])  # V half first
    with pytest.raises(ValueError, match="half"):
        region_page_table(dataclasses.replace(region, key_only=swapped), HKV, BS)
    shifted = dataclasses.replace(ko, slot=[(s + 1) % BS for s in ko.slot])
    with pytest.raises(ValueError, match="slot order"):
        region_page_table(dataclasses.replace(region, key_only=shifted), HKV, BS)


def batch(gen, cache, layout):
    """Five compacted requests among plain rows: two VECTOR ones with artifact A (one with three
    queries), one with artifact B, two plain ones; ``(step, table, query)``."""
    arts = {"A": artifact(1), "B": artifact(2)}
    specs = [  # prompt, seq_len, queries, artifact (None: plain kept set)
        (150, 170, 1, "A"), (120, 125, 3, "A"), (90, 95, 1, None), (140, 141, 1, "B"), (100, 117, 1, None)]
    heads, table, offset, first_block = {}, torch.zeros(2 * len(specs), 20, dtype=torch.int32), 0, 1
    for i, (prompt, seq_len, n, name) in enumerate(specs):
        counts = None if name is None else [COUNTS[(i + 1) % 2], COUNTS[i % 2]]
        compact = list(range(80 + 6 * i, 86 + 6 * i))
        blocks, _, region = compacted(gen, cache, layout, prompt, seq_len, compact, first_block, counts,
                                      arts.get(name))
        first_block += blocks.numel()
        row = 2 * i + 1  # odd batch rows are compacted, even ones are not
        offset += 2  # two query tokens of the plain row before it
        table[row, region.first_tail_block : blocks.numel()] = blocks[region.first_tail_block :].to(torch.int32)
        heads[row] = HeadRow(f"r{i}", region, offset, n, seq_len, blocks[region.first_tail_block :])
        offset += n
    step = EvictionStep(observe={}, head_rows=heads, table_rows={}, model=None)
    return step, table, torch.randn(offset, HKV * G * D, generator=gen)


def decoded(tensors, layer, query, kv, layout) -> torch.Tensor:
    output = torch.full((query.shape[0], HKV * G * D), 7.0)
    decode_head_rows(tensors, layer, query, kv, layout, output, HKV * G, D ** -0.5)
    return output.view(query.shape[0], HKV * G, D)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_head_rows_with_key_only_tokens_decode_as_the_torch_path(impl, seed, monkeypatch):
    if impl == "torch":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    else:
        pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(seed)
    layout = SplitHeadDimLayout(HKV, BS, D)
    cache = empty_caches(120)
    step, table, query = batch(gen, cache, layout)
    buffers = HeadRowBuffers(torch.device("cpu"))
    tensors = buffers.prepare(step, table, HKV, BS)
    assert [(s.lo, s.hi, s.weights is None) for s in tensors.spans] == [(0, 6, False), (6, 7, False)]
    assert tensors.spans[0].weights is not tensors.spans[1].weights  # one regression per artifact
    dropped = dataclasses.replace(tensors, spans=tuple(dataclasses.replace(s, weights=None) for s in tensors.spans))
    q = query.view(query.shape[0], HKV * G, D)
    for layer in range(LAYERS):
        got, without = decoded(tensors, layer, query, cache[layer], layout), decoded(dropped, layer, query,
                                                                                     cache[layer], layout)
        for head in step.head_rows.values():
            want = attend_row(head, layer, q, cache[layer], layout, D ** -0.5)
            rows = slice(head.query_offset, head.query_offset + head.num_queries)
            torch.testing.assert_close(got[rows], want, rtol=2e-4, atol=2e-5, msg=f"{layer} {head.req_id}")
            if head.region.key_only is not None and int(head.region.key_only.lens[layer].sum()):
                assert not torch.allclose(without[rows], want, rtol=2e-4, atol=2e-5), (layer, head.req_id)
        untouched = torch.ones(query.shape[0], dtype=torch.bool)
        untouched[tensors.query_index] = False
        assert bool((got[untouched] == 7.0).all())  # other rows keep the stock kernel's output
    pool = buffers.pool
    for row in step.head_rows.values():
        slot = pool.slots([row], HKV, BS)[0]
        ko_lens, positions = region_key_only(row.region, HKV)
        assert torch.equal(pool.ko_lens[:, slot], ko_lens)
        assert torch.equal(pool.ko_positions[:, slot, :, : positions.shape[-1]], positions)


def test_rows_without_key_only_tokens_join_the_first_artifacts_call(seed):
    gen = torch.Generator().manual_seed(seed)
    layout = SplitHeadDimLayout(HKV, BS, D)
    step, _, _ = batch(gen, empty_caches(120), layout)
    heads = list(step.head_rows.values())
    groups = artifact_groups(heads)
    assert [members for _, members in groups] == [[2, 4, 0, 1], [3]]
    assert groups[0][0] is heads[0].region.key_only.artifact
    plain = [dataclasses.replace(h, region=dataclasses.replace(h.region, key_only=None)) for h in heads]
    assert artifact_groups(plain) == [(None, [0, 1, 2, 3, 4])]
