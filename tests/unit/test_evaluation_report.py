"""The quality benchmark's pure parts: sweep grid, result resume, summary maths, kvpress mapping."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.quality.grid import FULL_CACHE, Point, ResultWriter, sweep_points
from benchmarks.quality.kvpress_target import press_spec
from benchmarks.quality.report import summarize, write_report
from benchmarks.quality.server_target import vllm_xargs


def _row(policy, budget, task, score, length=1024, engine="reference", uid=None):
    full = policy == "none"
    return {
        "engine": engine, "policy": policy, "allocation": "none" if full else "adakv",
        "granularity": "none" if full else "page", "budget": budget, "task": task,
        "uid": uid or f"{task}-{score}", "context_tokens": length, "protocol": "context", "score": score,
    }


def test_sweep_points_full_cache_once_then_budgets_below_one():
    points = sweep_points(["none", "snapkv", "knorm"], [1.0, 0.5, 0.1], [None], ["page", "head"])
    assert points[0] == FULL_CACHE
    assert len(points) == 1 + 2 * 2 * 2
    assert all(p.budget < 1 for p in points[1:])
    assert Point("knorm", None, "head", 0.1) in points



def test_sweep_points_policy_with_pinned_allocation_runs_under_it_only():
    points = sweep_points(["snapkv", "snapkv:uniform"], [0.2, 0.1], [None], ["head"])
    assert points[1:] == [Point("snapkv", None, "head", 0.2), Point("snapkv", None, "head", 0.1),
                          Point("snapkv", "uniform", "head", 0.2), Point("snapkv", "uniform", "head", 0.1)]

def test_summary_accuracy_interval_retention_and_flags():
    rows = (
        [_row("none", 1.0, "niah", s, uid=f"n{i}") for i, s in enumerate([1, 1, 1, 0])]
        + [_row("snapkv", 0.1, "niah", s, uid=f"n{i}") for i, s in enumerate([1, 0, 0, 0])]
        + [_row("none", 1.0, "vt", 0.0, uid=f"v{i}") for i in range(4)]
        + [_row("snapkv", 0.1, "vt", 0.25, uid=f"v{i}") for i in range(4)]
    )
    summary, flagged = summarize(rows, min_full_accuracy=0.1)
    get = {(r["policy"], r["task"], r["context_tokens"]): r for r in summary}
    niah = get[("snapkv", "niah", 1024)]
    assert niah["n"] == 4 and niah["accuracy"] == pytest.approx(0.25)
    assert niah["retention"] == pytest.approx(0.25 / 0.75)
    assert 0 < niah["ci_low"] < 0.25 < niah["ci_high"] < 1
    assert get[("snapkv", "vt", 1024)]["retention"] is None  # full cache near zero: no retention
    assert {(f["task"], f["context_tokens"]) for f in flagged} == {("vt", 1024), ("vt", "all")}
    avg = get[("snapkv", "all", 1024)]
    assert avg["n"] == 8 and avg["accuracy"] == pytest.approx((0.25 + 0.25) / 2)
    assert avg["retention"] == pytest.approx(0.25 / 0.75)  # vt left out of retention
    assert get[("none", "all", "all")]["retention"] == pytest.approx(1.0)
    assert set(niah) == {"run", "engine", "policy", "allocation", "granularity", "budget", "min_tokens", "protocol", "task",
                         "context_tokens", "n", "accuracy", "ci_low", "ci_high", "retention"}
    assert niah["protocol"] == "after"  # the runner's "context" protocol: the question after it


def test_writer_resumes_and_report_writes_files(tmp_path):
    path = tmp_path / "results.jsonl"
    writer = ResultWriter(path)
    rows = [_row("none", 1.0, "niah", 1.0, uid="a"), _row("snapkv", 0.5, "niah", 0.0, uid="a")]
    for r in rows:
        writer.write(r)
    writer.close()
    again = ResultWriter(path)
    assert again.has(rows[0]) and again.has(rows[1])
    assert not again.has(_row("snapkv", 0.2, "niah", 0.0, uid="a"))
    again.close()
    write_report([path], tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert any(r["task"] == "all" and r["policy"] == "snapkv" for r in summary)
    assert (tmp_path / "accuracy_vs_budget.png").stat().st_size > 1000
    assert "snapkv" in (tmp_path / "summary.md").read_text()


def test_server_xargs():
    assert vllm_xargs(FULL_CACHE) == {"kv_eviction": "none"}  # stock vLLM, said so
    assert vllm_xargs(Point("snapkv", None, "page", 0.2)) == {
        "kv_eviction": "snapkv", "kv_budget": 0.2, "kv_granularity": "page"}
    assert vllm_xargs(Point("knorm", "uniform", "head", 0.1))["kv_allocation"] == "uniform"


def test_kvpress_mapping():
    spec, allocation = press_spec(Point("snapkv", None, "page", 0.2))
    assert allocation == "adakv_floor" and spec["class"] == "AdaKVPress"
    assert spec["press"]["class"] == "SnapKVPress" and spec["press"]["compression_ratio"] == pytest.approx(0.8)
    spec, allocation = press_spec(Point("streamingllm", None, "page", 0.5))
    assert (spec["class"], spec["n_sink"], allocation) == ("StreamingLLMPress", 4, "uniform")
    spec, allocation = press_spec(Point("criticalkv", None, "page", 0.1))
    assert spec["class"] == "CriticalAdaKVPress" and spec["press"]["class"] == "SnapKVPress"
    assert press_spec(Point("criticalkv", "uniform", "page", 0.1))[0]["class"] == "CriticalKVPress"
    assert press_spec(FULL_CACHE) == (None, "none")
    with pytest.raises(KeyError):
        press_spec(Point("h2o", None, "page", 0.1))


def test_one_engine_under_two_protocols_is_not_pooled():
    rows = [_row("none", 1.0, "niah", 1.0, uid="a"), dict(_row("none", 1.0, "niah", 0.0, uid="a"), protocol="prompt")]
    summary, _ = summarize(rows)
    assert {r["run"] for r in summary} == {"reference/context", "reference/prompt"}
    assert {r["engine"] for r in summary} == {"reference"}
    assert all(r["n"] == 1 for r in summary)


def test_kvpress_worker_imports_nothing_of_ours():
    import ast
    from pathlib import Path

    import benchmarks.quality.kvpress_worker as worker

    tree = ast.parse(Path(worker.__file__).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert names <= {"__future__", "json", "sys", "time", "kvpress", "torch", "transformers"}


@pytest.mark.slow
def test_reference_runner_end_to_end_on_the_tiny_model(tiny_llama_dir, tmp_path):
    """run.py with two worker shards on a tiny random Llama: rows, summary, plot."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, str(root / "benchmarks/quality/run.py"), "--target", "reference",
           "--model-dir", str(tiny_llama_dir), "--kinds", "niah_single,qa", "--lengths", "512",
           "--n-per", "1", "--policies", "knorm,streamingllm", "--budgets", "1,0.5", "--workers", "2",
           "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    rows = [json.loads(line) for f in sorted(tmp_path.glob("*.jsonl")) for line in f.read_text().splitlines()]
    assert len(rows) == 2 * 3 and {r["policy"] for r in rows} == {"none", "knorm", "streamingllm"}
    assert all(0 <= r["score"] <= 1 and r["prompt_tokens"] <= 512 for r in rows)
    assert {r["memory_fraction"] for r in rows if r["policy"] != "none"} != {1.0}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {r["task"] for r in summary} == {"niah_single", "qa", "all"}
    assert (tmp_path / "accuracy_vs_budget.png").exists()


def test_kvpress_settings_give_kvpress_windows_only_where_they_differ():
    from benchmarks.quality.reference_target import KVPRESS_SETTINGS, point_config

    assert point_config(Point("knorm", "uniform", "head", 0.2)).window == 32
    assert point_config(Point("knorm", "uniform", "head", 0.2), KVPRESS_SETTINGS).window == 0
    assert point_config(Point("tova", "uniform", "head", 0.2), KVPRESS_SETTINGS).window == 1
    snap = point_config(Point("snapkv", "adakv_floor", "head", 0.2), KVPRESS_SETTINGS)
    assert (snap.window, snap.resolved_allocation) == (32, "adakv_floor")  # kvpress target sets window 32
    critical = Point("criticalkv", "adakv_floor", "head", 0.2)
    assert point_config(critical, KVPRESS_SETTINGS).epsilon == pytest.approx(1e-4)
    assert point_config(critical).epsilon == 0.0
    assert point_config(FULL_CACHE, KVPRESS_SETTINGS).keeps_everything


@pytest.mark.parametrize("prompt_len", [1000, 1024, 2030])
@pytest.mark.parametrize("budget", [0.1, 0.2])
def test_head_vs_page_compares_at_equal_held_blocks(prompt_len, budget):
    """page@blocks is given exactly the blocks head mode holds (K compact + tail)."""
    import math

    from benchmarks.quality.head_vs_page import settings
    from vllm_kvevict.cache.blocks import compact_blocks_needed
    from vllm_kvevict.policies import select_pages

    modes = {mode: (cfg, held) for mode, cfg, held in settings(budget, prompt_len, 32, 30, 3)}
    head, held = modes["head"]
    k = compact_blocks_needed(head, prompt_len, 32, 30, 3)
    assert held == k + (1 if prompt_len % 32 else 0)
    page_cfg, _ = modes["page@blocks"]
    blocks = math.ceil(prompt_len / 32)
    kept = select_pages(torch.rand(blocks), prompt_len, 32, page_cfg)
    assert kept.numel() == held
    assert modes["head@tokens"][1] > held  # as many tokens as page@blocks costs head mode more blocks
    fewer = select_pages(torch.rand(blocks), prompt_len, 32, modes["page@budget"][0])
    assert fewer.numel() <= held


def test_head_vs_page_summary_pairs_by_prompt():
    from benchmarks.quality.head_vs_page import summarize as hvp_summary

    def r(uid, mode, score, held):
        return {"uid": uid, "policy": mode, "budget": 0.1, "task": "vt", "score": score, "held_blocks": held,
                "prompt_blocks": 32, "memory_fraction": 0.1}

    rows = [r("a", "head", 1.0, 5), r("a", "page@blocks", 0.0, 5), r("b", "head", 0.5, 5), r("b", "page@blocks", 0.5, 5)]
    text = hvp_summary(rows)
    assert "| 0.1 | head | all | 2 | 0.750 |" in text
    assert "| 0.1 | 1 | 0 | 1 | 0 |" in text


def test_compare_pairs_engines_on_shared_prompts_and_flags_differences():
    from benchmarks.quality.report import compare

    rows = []
    for i in range(10):
        rows.append(dict(_row("knorm", 0.5, "niah", 1.0, engine="kvpress", uid=f"u{i}"), output="42"))
        rows.append(dict(_row("knorm", 0.5, "niah", float(i < 9), engine="reference", uid=f"u{i}"), output="42" if i < 9 else "7"))
        rows.append(dict(_row("knorm", 0.1, "niah", 1.0, engine="kvpress", uid=f"u{i}"), output="42"))
        rows.append(dict(_row("knorm", 0.1, "niah", 0.0, engine="reference", uid=f"u{i}"), output="7"))
    rows.append(dict(_row("knorm", 0.1, "niah", 1.0, engine="reference", uid="only-ours"), output="42"))
    text = compare(rows, "kvpress", "reference")
    assert "| knorm | adakv | page | 0.5 | 0 | 10 | 1.000 | [0.72, 1.00] | 0.900 |" in text and "| no | 9/10 | 9/10 |" in text
    assert "| knorm | adakv | page | 0.1 | 0 | 10 | 1.000 |" in text and "| **yes** | 0/10 | 0/10 |" in text


def test_vector_rows_carry_vector_true_and_the_base_scorer_and_never_pool_with_plain(tmp_path):
    from benchmarks.quality.grid import base_row, result_key
    from benchmarks.quality.reference_target import point_config
    from benchmarks.quality.report import table

    points = sweep_points(["keydiff"], [0.1], [None], ["head"], vectors=(False, True))
    assert points[1:] == [Point("keydiff", None, "head", 0.1), Point("keydiff", None, "head", 0.1, vector=True)]
    assert point_config(points[2]).vector == "on" and point_config(points[1]).vector == "off"
    assert point_config(points[2], vector_share=0.02).vector_share == 0.02
    assert point_config(points[1], vector_share=0.02).vector == "off"  # only VECTOR points take it

    class Task:
        kind, uid, context_tokens, prompt_ids, question_position = "niah", "u", 1024, [1, 2], "after"

    plain_row, vector_row = (base_row("reference", "reference", Task, p, "context", "adakv") for p in points[1:])
    assert "vector" not in plain_row and vector_row["vector"] is True and vector_row["policy"] == "keydiff"
    assert result_key(plain_row) != result_key(vector_row)
    rows = [_row("none", 1.0, "niah", 1.0, uid="a"), _row("keydiff", 0.1, "niah", 0.0, uid="a"),
            dict(_row("keydiff", 0.1, "niah", 1.0, uid="a"), vector=True)]
    summary, _ = summarize(rows)
    avg = [r for r in summary if r["task"] == "all" and r["context_tokens"] == "all" and r["policy"] == "keydiff"]
    assert sorted((r.get("vector", False), r["accuracy"]) for r in avg) == [(False, 0.0), (True, 1.0)]
    assert all("vector" not in r for r in summary if not r.get("vector"))
    assert "| keydiff+vector |" in table(summary, [])
