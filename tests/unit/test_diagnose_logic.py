"""The diagnostic's pure logic: evidence spans and statuses, swap sampling, mode classification."""

from __future__ import annotations

import pytest
import torch

from vllm_kvevict.evaluation.diagnose_evidence import Span, count_statuses, coverage, evidence_mask, span_status, spans_from_offsets
from vllm_kvevict.evaluation.diagnose_modes import dominant_mode, format_table, positive_share, summarize
from vllm_kvevict.evaluation.diagnose_slots import Unit, apply_swap, boundary_swaps, repair_head, sample_swaps, slot_kept


def char_offsets(text: str) -> list[tuple[int, int]]:
    """One token per character: offsets of a character tokenizer."""
    return [(i, i + 1) for i in range(len(text))]


def test_spans_are_word_bounded_occurrences_in_prompt_order():
    text = "a 123 b 1234 c 123. d 9123"
    spans = spans_from_offsets(text, char_offsets(text), ["123"])
    assert [(s.start, s.end) for s in spans] == [(2, 5), (15, 18)]  # not inside 1234 or 9123
    assert all(text[s.start:s.end] == "123" for s in spans)


def test_spans_cover_every_token_touching_the_answer():
    text = "is: 8945493."
    offsets = [(0, 2), (2, 3), (3, 4), (4, 8), (8, 11), (11, 12)]  # a token spanning "8945" and one "493"
    (span,) = spans_from_offsets(text, offsets, ["8945493"])
    assert (span.start, span.end) == (3, 5)


def test_spans_deduplicate_answers_and_match_case_insensitively():
    text = "Paris is nice. PARIS again."
    spans = spans_from_offsets(text, char_offsets(text), ["paris", "paris"])
    assert len(spans) == 2


def test_span_status_cases():
    span = Span("x", 2, 6)
    L = 10
    kept = torch.zeros(L, dtype=torch.bool)
    attention = torch.arange(L)  # token i ranked i: 2..5 are inside a count of 6, outside a count of 2
    assert span_status(kept.clone().index_fill_(0, torch.arange(2, 6), True), span, attention, 6) == "kept"
    partial = kept.clone().index_fill_(0, torch.tensor([2]), True)
    assert span_status(partial, span, attention, 6) == "partial_visible"
    assert span_status(partial, span, attention, 2) == "partial_hidden"
    assert span_status(kept, span, attention, 6) == "lost_visible"
    assert span_status(kept, span, attention, 2) == "lost_hidden"
    # half of the missing tokens visible counts as visible
    assert span_status(kept, span, attention, 4) == "lost_visible"


def test_coverage_counts_one_status_per_layer_head_span():
    L = 8
    spans = [Span("a", 0, 2), Span("b", 4, 6)]
    masks = [torch.tensor([[1, 1, 0, 0, 1, 0, 0, 1], [0, 0, 0, 0, 1, 1, 1, 1]], dtype=torch.bool)]
    ranks = [torch.arange(L).repeat(2, 1)]
    status = coverage(masks, spans, ranks)
    assert status == [[["kept", "partial_hidden"], ["lost_visible", "kept"]]]
    counts = count_statuses(status)
    assert counts["kept"] == 2 and counts["partial_hidden"] == 1 and counts["lost_visible"] == 1
    assert evidence_mask(spans, L).tolist() == [True, True, False, False, True, True, False, False]


def test_slot_kept_judges_a_partial_last_slot_on_its_real_tokens():
    assert slot_kept(torch.tensor([0, 1, 2, 3, 8, 9]), 4, 10).tolist() == [True, False, True]
    assert slot_kept(torch.tensor([0, 1, 2, 8]), 4, 10).tolist() == [False, False, False]


def token_unit(kept_slots, protected=(), layer=0, head=0, ranks=None, size=6):
    rank = torch.tensor(ranks) if ranks is not None else torch.arange(size)
    kept = torch.zeros(size, dtype=torch.bool)
    kept[list(kept_slots)] = True
    prot = torch.zeros(size, dtype=torch.bool)
    prot[list(protected)] = True
    return Unit(layer, head, rank, prot, kept, 1)


def test_boundary_swaps_pair_lowest_kept_with_highest_evicted_never_protected():
    # ranks: slot 5 first choice ... slot 0 last; kept 5, 4, 3 (3 protected), 1
    unit = token_unit([5, 4, 3, 1], protected=[3], ranks=[5, 4, 3, 2, 1, 0])
    assert boundary_swaps(unit, 2) == [(1, 2), (1, 0), (4, 2), (4, 0)]
    assert boundary_swaps(unit, 1) == [(1, 2)]


def test_sample_swaps_is_seeded_sized_and_skips_units_without_a_choice():
    units = [token_unit([0, 1, 2], layer=l, head=h) for l in range(3) for h in range(2)]
    units.append(token_unit(range(6), layer=3, head=0))  # keeps everything: nothing to swap in
    a, b = sample_swaps(units, 2, 3, seed=7), sample_swaps(units, 2, 3, seed=7)
    assert a == b and len(a) == 3 * 2 * 2
    assert all(s.unit != 6 for s in a)
    assert len({s.unit for s in sample_swaps(units, 1, 100, seed=0)}) == 6
    with pytest.raises(ValueError, match="m and units"):
        sample_swaps(units, 0, 3, seed=0)


def test_apply_swap_changes_one_head_or_every_head_at_a_fixed_count():
    L = 8
    kept = [[torch.tensor([0, 1, 6, 7]), torch.tensor([2, 3, 6, 7])] for _ in range(2)]
    head_units = [Unit(1, 0, torch.arange(L), torch.zeros(L, dtype=torch.bool), slot_kept(kept[1][0], 1, L), 1)]
    from vllm_kvevict.evaluation.diagnose_slots import Swap

    new = apply_swap(kept, head_units, Swap(0, 1, 4), L)
    assert new[1][0].tolist() == [0, 4, 6, 7]
    assert all(torch.equal(new[l][h], kept[l][h]) for l, h in [(0, 0), (0, 1), (1, 1)])
    assert kept[1][0].tolist() == [0, 1, 6, 7]  # not modified
    page_units = [Unit(None, None, torch.arange(4), torch.zeros(4, dtype=torch.bool), torch.tensor([1, 0, 0, 1], dtype=torch.bool), 2)]
    pages = [[torch.tensor([0, 1, 6, 7])] * 2 for _ in range(2)]
    swapped = apply_swap(pages, page_units, Swap(0, 0, 2), L)
    assert all(idx.tolist() == [4, 5, 6, 7] for row in swapped for idx in row)


def test_repair_head_puts_evidence_back_at_a_fixed_count_and_never_drops_locked_tokens():
    kept = torch.tensor([0, 3, 5, 8, 9])
    rank = torch.tensor([0, 9, 9, 5, 9, 7, 9, 9, 1, 2])  # among kept, 5 then 3 are the worst
    locked = torch.zeros(10, dtype=torch.bool)
    locked[[0, 8, 9]] = True
    out = repair_head(kept, torch.tensor([1, 2, 3]), rank, locked)
    assert out.tolist() == [0, 1, 2, 8, 9] and out.numel() == kept.numel()
    # only two tokens may go: only two of three missing come back
    out = repair_head(torch.tensor([0, 3, 8, 9]), torch.tensor([1, 2, 4]), rank, locked)
    assert out.numel() == 4 and set(out.tolist()) >= {0, 8, 9}


def test_dominant_mode():
    assert dominant_mode(0.05, {"support": 3.0, "ranking": None, "projection": None}) == "none"
    assert dominant_mode(5.0, {"support": None, "ranking": None, "projection": None}) == "outside_evidence"
    assert dominant_mode(5.0, {"support": 0.05, "ranking": -1.0, "projection": None}) == "outside_evidence"
    assert dominant_mode(5.0, {"support": 1.0, "ranking": None, "projection": 4.0}) == "projection"
    assert dominant_mode(5.0, {"support": 2.0, "ranking": 2.0, "projection": 2.0}) == "support"  # paper order


def test_positive_share_counts_margins_above_the_tolerance():
    assert positive_share([]) is None
    assert positive_share([0.5, 0.05, -1.0, 0.2], tol=0.1) == 0.5


def run(policy, score, dominant, margins, statuses):
    return {"policy": policy, "budget": 0.1, "score": score, "gap": 1.0, "dominant": dominant, "seconds": 1.0,
            "gains": {"support": None, "ranking": 1.0, "projection": 2.0}, "statuses": statuses,
            "swaps": [{"margin": m, "in_evidence": i, "out_evidence": False} for m, i in margins]}


def test_summarize_pools_runs_per_policy_and_budget():
    rows = summarize([
        run("a", 0.0, "projection", [(1.0, True), (0.0, False)], {"kept": 1, "partial_hidden": 3}),
        run("a", 1.0, "none", [(0.0, False)], {"kept": 4}),
        run("b", 0.0, "ranking", [], {"lost_visible": 2}),
    ])
    a = next(r for r in rows if r["policy"] == "a")
    assert a["n"] == 2 and a["accuracy"] == 0.5
    assert a["dominant_failing"] == {"projection": 1} and a["dominant_mode"] == "projection"
    assert a["positive_share"] == pytest.approx(1 / 3)
    assert a["positive_share_evidence_in"] == 1.0 and a["positive_share_no_evidence"] == 0.0
    assert a["status_share"]["kept"] == pytest.approx(5 / 8)
    table = format_table(rows)
    assert "| a | 0.1 | 2 |" in table and "| b | 0.1 | 1 |" in table


class CharTokenizer:
    """Token ids are character codes (``decode`` only)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_the_measured_answer_is_the_shortest_correct_prefix_of_the_full_cache_output():
    from types import SimpleNamespace

    from vllm_kvevict.evaluation.diagnose_margin import shortest_correct

    task = SimpleNamespace(answers=["12", "34"])
    out = [ord(c) for c in ":\n1. 12\n2. 345\n3. 34\n4. more"]
    cut = shortest_correct(task, CharTokenizer(), out)
    assert CharTokenizer().decode(cut) == ":\n1. 12\n2. 345\n3. 34"  # 345 is not 34: word-bounded
    assert shortest_correct(task, CharTokenizer(), [ord(c) for c in " 12 only"]) is None
