"""VALIDATION.md's table maths: paired differences against a baseline, sign test, bootstrap."""

from __future__ import annotations

import math

import pytest

from benchmarks.quality.validate_table import bootstrap_interval, paired, sign_test_p, summarize


def _row(policy, budget, uid, score, task="niah_single"):
    full = policy == "none"
    return {"policy": policy, "allocation": "none" if full else "adakv", "granularity": "none" if full else "head",
            "budget": budget, "uid": uid, "task": task, "score": score}


def test_sign_test_matches_the_binomial_tails():
    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(5, 0) == pytest.approx(2 / 32)
    assert sign_test_p(0, 5) == pytest.approx(2 / 32)
    assert sign_test_p(3, 3) == 1.0
    assert sign_test_p(8, 2) == pytest.approx(2 * sum(math.comb(10, i) for i in range(3)) / 1024)


def test_bootstrap_interval_brackets_the_mean_and_is_reproducible():
    diffs = [1.0] * 6 + [0.0] * 14 + [-1.0] * 4
    low, high = bootstrap_interval(diffs, resamples=2000)
    assert low < sum(diffs) / len(diffs) < high
    assert (low, high) == bootstrap_interval(diffs, resamples=2000)
    assert bootstrap_interval([0.5, 0.5, 0.5], resamples=200) == (0.5, 0.5)


def test_paired_counts_only_prompts_both_ran():
    out = paired({"a": 1.0, "b": 0.0, "c": 0.5, "d": 1.0}, {"a": 0.0, "b": 0.0, "c": 1.0})
    assert out["n_pairs"] == 3
    assert (out["better"], out["worse"], out["tie"]) == (1, 1, 1)
    assert out["diff"] == pytest.approx((1.0 + 0.0 - 0.5) / 3)


def test_summarize_pairs_each_budget_with_the_baseline_at_that_budget():
    rows = [_row("none", 1.0, u, 1.0) for u in "abcd"]
    rows += [_row("snapkv", 0.1, u, s) for u, s in zip("abcd", (1, 0, 0, 0))]
    rows += [_row("snapkv", 0.2, u, 1.0) for u in "abcd"]
    rows += [_row("laprox", 0.1, u, s) for u, s in zip("abcd", (1, 1, 1, 0))]
    rows += [_row("snapkv", 0.1, u, 0.0) | {"allocation": "uniform"} for u in "abcd"]
    summary = summarize(rows, [("snapkv", "adakv"), ("snapkv", "uniform")])
    assert summary[0]["policy"] == "none" and summary[0]["vs"] == {}
    lap = next(e for e in summary if e["policy"] == "laprox")
    assert lap["n"] == 4 and lap["accuracy"] == pytest.approx(0.75) and lap["retention"] == pytest.approx(0.75)
    assert lap["vs"]["snapkv:adakv"]["diff"] == pytest.approx(0.5)
    assert (lap["vs"]["snapkv:adakv"]["better"], lap["vs"]["snapkv:adakv"]["worse"]) == (2, 0)
    assert lap["vs"]["snapkv:uniform"]["diff"] == pytest.approx(0.75)
    snap = [e for e in summary if e["policy"] == "snapkv" and e["allocation"] == "adakv"]
    assert all("snapkv:adakv" not in e["vs"] for e in snap)
    assert next(e for e in snap if e["budget"] == 0.1)["vs"]["snapkv:uniform"]["diff"] == pytest.approx(0.25)
    assert "snapkv:uniform" not in next(e for e in snap if e["budget"] == 0.2)["vs"]
