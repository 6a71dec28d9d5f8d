"""Scoring (RULER contains-match) and the Wilson interval: pure logic."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_kvevict.evaluation.scoring import answer_found, score, wilson_interval


def _task(*answers: str):
    return SimpleNamespace(answers=list(answers))


def test_score_is_fraction_of_answers_found_case_insensitive():
    task = _task("1234567", "Nairobi", "ABCDE", "baker")
    assert score(task, "nairobi and abcde; also 1234567.") == pytest.approx(0.75)
    assert score(task, "") == 0.0
    assert score(task, "BAKER NAIROBI abcde 1234567") == 1.0


def test_contains_match_respects_word_boundaries():
    assert answer_found("red", "The answer is Red.")
    assert not answer_found("red", "I answered it.")
    assert not answer_found("1234567", "the number is 12345678")
    assert answer_found("1234567", "is:1234567.")
    assert answer_found("quiet-river", "for quiet-river it is")


def test_wilson_interval_known_values():
    low, high = wilson_interval(5, 10)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)
    low, high = wilson_interval(0, 20)
    assert low == 0.0 and round(high, 4) == 0.1611
    low, high = wilson_interval(20, 20)
    assert high == 1.0 and round(low, 4) == 0.8389
    assert wilson_interval(0, 0) == (0.0, 1.0)
