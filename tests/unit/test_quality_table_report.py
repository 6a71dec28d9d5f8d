"""table_report.py: the two protocols apart, cells the full cache fails left out, paired
differences on the same prompts, and how many prompts a half-width of 0.1 would take."""

from benchmarks.quality.table_report import render, summarize


def _row(protocol, policy, allocation, budget, task, i, score, length=1024):
    return {"run": "table", "engine": "reference", "policy": policy, "allocation": allocation, "granularity": "head",
            "budget": budget, "task": task, "uid": f"{task}-{length}-{i}", "context_tokens": length,
            "protocol": protocol, "score": score, "cpu_seconds": 1.0, "prefill_cpu_seconds": 4.0}


def _rows():
    rows = []
    for protocol in ("context", "prompt"):
        for i in range(4):
            rows.append(_row(protocol, "none", "none", 1.0, "niah", i, 1.0))
            rows.append(_row(protocol, "none", "none", 1.0, "cwe", i, 0.0))  # the full cache fails: left out
            rows.append(_row(protocol, "snapkv", "adakv", 0.2, "niah", i, float(protocol == "prompt" or i == 0)))
            rows.append(_row(protocol, "snapkv", "uniform", 0.2, "niah", i, float(i < 2)))
            rows.append(_row(protocol, "snapkv", "adakv", 0.2, "cwe", i, 1.0))
    return rows


def test_protocols_apart_failed_cells_out_and_paired_differences():
    summary = summarize(_rows(), ("snapkv", "uniform"), min_full=0.1)
    assert [(e["protocol"], e["task"]) for e in summary["excluded"]] == [("after", "cwe"), ("inside", "cwe")]
    after = {(e["policy"], e["allocation"]): e for e in summary["protocols"]["after"]}
    inside = {(e["policy"], e["allocation"]): e for e in summary["protocols"]["inside"]}
    assert after[("none", "none")]["n"] == 4  # the cwe prompts are not pooled
    assert after[("snapkv", "adakv")]["accuracy"] == 0.25 and after[("snapkv", "adakv")]["retention"] == 0.25
    assert inside[("snapkv", "adakv")]["retention"] == 1.0
    vs = after[("snapkv", "adakv")]["adakv_vs_uniform"]
    assert (vs["n_pairs"], vs["diff"], vs["better"], vs["worse"], vs["tie"]) == (4, -0.25, 0, 1, 3)
    assert after[("snapkv", "adakv")]["vs_baseline"]["diff"] == -0.25
    assert "inside_vs_after" not in after[("snapkv", "adakv")]
    assert inside[("snapkv", "adakv")]["inside_vs_after"]["diff"] == 0.75
    assert after[("snapkv", "adakv")]["vs_full"]["diff"] == -0.75


def test_resolution_projects_prompts_for_a_tenth_and_cost_counts_one_prefill():
    summary = summarize(_rows(), ("snapkv", "adakv"), min_full=0.1)
    res = summary["resolution"]
    assert res["pairs"] == 4 and res["max_half_width"] > 0.1
    # the interval shrinks as 1/sqrt(n): the widest half-width w over n pairs needs n (w / 0.1)^2
    assert res["prompts_for_half_width"]["0.1"] == round(4 * (res["max_half_width"] / 0.1) ** 2)
    # every prompt that ran, left out or not: one prefill (4 CPU-s) and its rows of both protocols
    # (1 CPU-s each): 3 a protocol for niah, 2 for cwe
    assert summary["cost"]["1024"] == {"prompts": 8, "cpu_seconds_per_prompt": ((4 + 6) + (4 + 4)) / 2}
    text = render(summary)
    assert "## Question after" in text and "## Question inside" in text and "Left out" in text


def test_paired_resamples_drafts_not_prompts():
    from benchmarks.quality.table_report import draft_of, paired

    assert draft_of("niah_multikey-4096-after-400013") == "niah_multikey-400013"
    # two drafts, each at three lengths: prompts of one draft move together, so resampling drafts
    # gives an interval wider than the prompts' count alone would suggest, with 2 drafts in the sign test
    a = {f"niah_single-{n}-after-{s}": float(s == 1) for n in (1024, 2048, 4096) for s in (0, 1)}
    b = {u: 0.0 for u in a}
    p = paired(a, b)
    assert (p["n_pairs"], p["drafts"], p["diff"], p["better"], p["tie"]) == (6, 2, 0.5, 3, 3)
    assert (p["diff_low"], p["diff_high"]) == (0.0, 1.0) and p["sign_p"] == 1.0


def test_vector_rows_are_their_own_setting_paired_with_plain_eviction():
    rows = []
    for i in range(4):
        rows.append(_row("context", "none", "none", 1.0, "niah", i, 1.0))
        rows.append(_row("context", "keydiff", "adakv", 0.1, "niah", i, float(i == 0)))
        gated = dict(vector=True, vector_residual="relative", vector_min_r2=0.6)
        rows.append(dict(_row("context", "keydiff", "adakv", 0.1, "niah", i, float(i < 3)), **gated))
        rows.append(dict(_row("context", "keydiff", "adakv", 0.1, "niah", i, 0.0), **{**gated, "vector_min_r2": 0.8}))
    summary = summarize(rows, ("keydiff", "adakv"), min_full=0.1)
    after = {(e["policy"], e["vector"]): e for e in summary["protocols"]["after"]}
    assert set(after) == {("none", ""), ("keydiff", ""), ("keydiff", "relative, R^2 >= 0.6"), ("keydiff", "relative, R^2 >= 0.8")}
    gate6 = after[("keydiff", "relative, R^2 >= 0.6")]
    assert after[("keydiff", "")]["accuracy"] == 0.25 and gate6["accuracy"] == 0.75
    vs = gate6["vector_vs_plain"]
    assert (vs["n_pairs"], vs["diff"], vs["better"], vs["worse"]) == (4, 0.5, 2, 0)
    assert gate6["vs_baseline"]["diff"] == 0.5  # the baseline is plain keydiff
    assert after[("keydiff", "relative, R^2 >= 0.8")]["vector_vs_plain"]["diff"] == -0.25
    assert "vector_vs_plain" not in after[("keydiff", "")] and "vs_baseline" not in after[("keydiff", "")]
    text = render(summary)
    assert "| keydiff (adakv) + VECTOR (relative, R^2 >= 0.6) | 0.1 |" in text and "VECTOR minus plain eviction" in text


def test_a_prompt_in_two_folders_counts_once_in_the_left_out_rule():
    rows = [_row("context", "none", "none", 1.0, "cwe", 0, 1.0)] * 3  # the same prompt from three folders
    rows += [_row("context", "none", "none", 1.0, "cwe", i, 0.0) for i in range(1, 10)]
    summary = summarize(rows, ("keydiff", "adakv"), min_full=0.15)
    assert summary["excluded"] == [{"protocol": "after", "task": "cwe", "context_tokens": 1024,
                                    "full_accuracy": 0.1, "n": 10}]
