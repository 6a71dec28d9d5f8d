"""lkv_compare.py: two artifacts' runs of the same settings paired on the prompts both hold, only
the settings that read the artifact, cells the full cache fails left out."""

from benchmarks.quality.lkv_compare import compare, render


def _row(policy, allocation, budget, task, i, score, protocol="context"):
    return {"policy": policy, "allocation": allocation, "budget": budget, "task": task, "uid": f"{task}-1024-after-{i}",
            "context_tokens": 1024, "protocol": protocol, "score": score}


def _run(lkv_scores, extra=()):
    rows = [_row("none", "none", 1.0, "niah", i, 1.0) for i in range(len(lkv_scores))]
    rows += [_row("none", "none", 1.0, "cwe", 0, 0.0), _row("lkv", "lkv", 0.2, "cwe", 0, 1.0)]  # full cache fails cwe
    rows += [_row("lkv", "lkv", 0.2, "niah", i, s) for i, s in enumerate(lkv_scores)]
    rows += [_row("keydiff", "adakv", 0.2, "niah", i, 1.0) for i in range(len(lkv_scores))]  # reads no artifact
    return rows + list(extra)


def test_new_minus_old_on_common_prompts_of_the_settings_reading_the_artifact():
    new = _run([1.0, 1.0, 0.0, 1.0], extra=[_row("lkv", "lkv", 0.2, "niah", 9, 1.0)])  # prompt 9: new only
    old = _run([1.0, 0.0, 0.0])
    (entry,) = compare(new, old, [], min_full=0.1)
    assert (entry["protocol"], entry["budget"], entry["policy"], entry["allocation"]) == ("after", 0.2, "lkv", "lkv")
    assert entry["n"] == 3  # niah 0-2: common to both, cwe left out
    assert (entry["new"], entry["old"]) == (2 / 3, 1 / 3)
    assert (entry["diff"], entry["better"], entry["worse"]) == (1 / 3, 1, 0)
    assert "| after | 0.2 | lkv + lkv | 3 | 0.67 | 0.33 | +0.333" in render([entry])
