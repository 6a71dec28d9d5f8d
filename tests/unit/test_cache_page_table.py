"""Head-page assignment on random, unequal head budgets: fit, no slot used twice, own plane first."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_kvevict.cache import (
    CompactRegionOverflow,
    LayerBudgetBound,
    assign_head_pages,
    head_pages_bound,
    kept_positions_tensor,
    page_table_tensor,
    plan_compaction,
)
from vllm_kvevict.policies import KeptSet

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # one torch thread: see conftest


def random_split(total: int, num_kv_heads: int, head_max: int, generator: torch.Generator) -> list[int]:
    """Budgets summing to ``total`` (each in ``[0, head_max]``), skewed: zeros, a full head, 1 mod bs."""
    kind = int(torch.randint(0, 4, (1,), generator=generator))
    if kind == 0:  # Dirichlet-like skew
        weights = torch.rand(num_kv_heads, generator=generator) ** 4
    elif kind == 1:  # one head keeps as much as it can, some heads nothing
        weights = torch.zeros(num_kv_heads)
        weights[int(torch.randint(0, num_kv_heads, (1,), generator=generator))] = 1.0
        weights += torch.rand(num_kv_heads, generator=generator) * (torch.rand(num_kv_heads, generator=generator) < 0.3)
    else:
        weights = torch.rand(num_kv_heads, generator=generator)
    budgets = [min(head_max, int(w)) for w in (weights / weights.sum() * total).floor()]
    left = total - sum(budgets)
    for g in torch.randperm(num_kv_heads, generator=generator).tolist() * (left + 1):  # fill up to head_max
        if left == 0:
            break
        add = min(left, head_max - budgets[g])
        budgets[g] += add
        left -= add
    assert sum(budgets) == total and all(0 <= b <= head_max for b in budgets)
    return budgets


def worst_split(total: int, num_kv_heads: int, block_size: int, head_max: int) -> list[int] | None:
    """Heads ``0 .. Hkv-2`` with a page-count-maximising ``k * bs + 1`` tokens, the last the rest."""
    each = min(head_max, (total // num_kv_heads // block_size) * block_size + 1)
    budgets, left = [], total
    for _ in range(num_kv_heads - 1):
        budgets.append(min(each, left))
        left -= budgets[-1]
    budgets.append(left)
    return budgets if left <= head_max else None


def kept_from_budgets(budgets: torch.Tensor, prompt_len: int, generator: torch.Generator) -> KeptSet:
    indices = [
        [torch.sort(torch.randperm(prompt_len, generator=generator)[: int(b)]).values for b in layer]
        for layer in budgets
    ]
    return KeptSet(indices=indices, head_budgets=budgets.clone(), scores=[])


def check_plan(plan, kept: KeptSet, compact_blocks: list[int], block_size: int, num_kv_heads: int) -> None:
    allowed = {b * num_kv_heads + p for b in compact_blocks for p in range(num_kv_heads)}
    pages, lens = page_table_tensor(plan)
    assert torch.equal(lens.long(), kept.head_budgets)
    positions = kept_positions_tensor(plan)
    for layer in range(kept.num_layers):
        used = [p for head in plan.head_pages[layer] for p in head]
        assert len(used) == len(set(used)) and set(used) <= allowed
        for g, head in enumerate(plan.head_pages[layer]):
            n = int(kept.head_budgets[layer, g])
            assert len(head) == math.ceil(n / block_size)
            own = min(len(head), len(compact_blocks))
            assert head[:own] == [b * num_kv_heads + g for b in compact_blocks[:own]], "own plane first"
            assert pages[layer, g, : len(head)].tolist() == head
            assert torch.all(pages[layer, g, len(head):] == -1)
            assert positions[layer, g, :n].tolist() == kept.indices[layer][g].tolist()
        gather = plan.layer_gather(layer)
        slots = gather.dst_page * block_size + gather.dst_slot
        assert slots.unique().numel() == slots.numel(), "a (head-page, slot) written twice"
        assert torch.all(gather.dst_slot < block_size)
        for g in range(num_kv_heads):
            mine = gather.head == g
            assert torch.equal(gather.src_positions[mine], kept.indices[layer][g])
            rank = torch.arange(int(mine.sum()))
            assert torch.equal(gather.dst_slot[mine], rank % block_size)
    assert int(plan.offsets[-1]) == kept.kept_tokens() == plan.layer.numel()


@pytest.mark.parametrize("num_kv_heads", [1, 2, 3, 8])
@pytest.mark.parametrize("block_size", [16, 32, 128])
def test_random_unequal_budgets_fit_in_k_blocks(block_size, num_kv_heads):
    generator = torch.Generator().manual_seed(block_size * 10 + num_kv_heads)
    num_layers = 6
    for trial in range(6):
        prompt_len = int(torch.randint(1, 700, (1,), generator=generator))
        mean = int(torch.randint(0, prompt_len + 1, (1,), generator=generator))
        bound = LayerBudgetBound(mean, prompt_len)
        k = math.ceil(head_pages_bound(bound, block_size, num_kv_heads) / num_kv_heads)
        assert k <= math.ceil(mean / block_size) + 1
        # layers keep Hkv * mean or fewer tokens, split however unequally
        rows = []
        for layer in range(num_layers):
            total = num_kv_heads * mean - (0 if layer % 2 == 0 else int(torch.randint(0, mean + 1, (1,), generator=generator)))
            worst = worst_split(total, num_kv_heads, block_size, prompt_len) if layer == 0 else None
            if worst is not None:  # the bound is tight: this split needs all K blocks
                assert sum(math.ceil(b / block_size) for b in worst) > num_kv_heads * (k - 1)
            rows.append(worst or random_split(total, num_kv_heads, prompt_len, generator))
        budgets = torch.tensor(rows, dtype=torch.int64)
        kept = kept_from_budgets(budgets, prompt_len, generator)
        compact_blocks = torch.randperm(4 * k + 8, generator=generator)[:k].tolist()
        plan = plan_compaction(kept, compact_blocks, block_size, num_kv_heads)
        check_plan(plan, kept, compact_blocks, block_size, num_kv_heads)


def test_one_head_keeping_everything_borrows_the_free_planes():
    # Hkv=3, bs=4, mean 4: head 0 keeps 12 tokens (3 pages), the others nothing -> K = 2 blocks
    bound = LayerBudgetBound(4, 12)
    k = math.ceil(head_pages_bound(bound, 4, 3) / 3)
    assert k == 2
    pages = assign_head_pages([3, 0, 0], [7, 5], 3)
    assert pages == [[21, 15, 22], [], []]  # own plane of blocks 7 and 5, then block 7 plane 1
    with pytest.raises(CompactRegionOverflow, match="7 head-pages"):
        assign_head_pages([3, 2, 2], [7, 5], 3)


def test_plan_raises_when_a_layer_does_not_fit():
    budgets = torch.tensor([[8, 0], [16, 16]])
    kept = kept_from_budgets(budgets, 20, torch.Generator().manual_seed(0))
    with pytest.raises(CompactRegionOverflow, match="layer 1"):
        plan_compaction(kept, [3], 8, 2)  # layer 1 needs 4 head-pages, one block holds 2
    plan_compaction(kept, [3, 4], 8, 2)  # exactly 4 planes


def test_plan_rejects_inconsistent_input():
    budgets = torch.tensor([[2, 1]])
    kept = kept_from_budgets(budgets, 10, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="repeat"):
        plan_compaction(kept, [1, 1], 4, 2)
    with pytest.raises(ValueError, match="num_kv_heads"):
        plan_compaction(kept, [1], 4, 3)
    kept.head_budgets = torch.tensor([[1, 1]])
    with pytest.raises(ValueError, match="head_budgets"):
        plan_compaction(kept, [1], 4, 2)
