"""The serving benchmark's report: each plugin row against the stock row of the same shape, the
Amdahl bound from stock's prefill share and the capacity ratio, the targets, and that it writes
RESULTS.md, summary.json and the plot (benchmarks/serving/report.py)."""

from __future__ import annotations

import json

import pytest

from benchmarks.serving import report

META = {"device": "test", "vllm": "0.26.0", "engine": "e", "plan": {"kv_tokens": 100, "kv_cache_bytes": 1}}


def _row(policy, flat, out_tok_s, max_running, elapsed, prefill, prompt=8192, output=256, kept=None):
    return {"policy": policy, "flat": flat, "prompt_tokens": prompt, "output_tokens": output, "requests": 24,
            "elapsed_s": elapsed, "output_tok_s": out_tok_s, "total_tok_s": 1.0, "max_running": max_running,
            "preemptions": 0, "ttft_median_s": 1.0, "tpot_median_s": 0.01, "kept_share": kept,
            "prefill_elapsed_s": prefill}


def test_bound_ratio_and_scoring_share():
    stock = {"meta": META, "rows": [_row("stock", {}, 100.0, 8, 20.0, 5.0)]}
    head = {"kv_eviction": "criticalkv", "kv_budget": 0.1}
    plugin = {"meta": META, "rows": [_row("head-0.1", head, 250.0, 32, 8.0, 5.1, kept=0.12)]}
    stock_row, plugin_row = report.join(stock, plugin)
    assert stock_row["throughput_ratio"] == 1.0 and stock_row["bound"] == 1.0
    p, c = 5.0 / 20.0, 32 / 8
    assert plugin_row["prefill_share_stock"] == p and plugin_row["capacity_ratio"] == c
    assert plugin_row["bound"] == pytest.approx(1 / (p + (1 - p) / c), abs=1e-3)
    assert plugin_row["throughput_ratio"] == 2.5 and plugin_row["of_bound"] == pytest.approx(2.5 / plugin_row["bound"],
                                                                                               abs=1e-3)
    assert plugin_row["scoring_share_of_prefill"] == pytest.approx(0.02)
    assert plugin_row["kv_tokens_per_request"] == round(0.12 * 8192 + 256)
    goal = report.targets([stock_row, plugin_row])
    assert goal["every_row_of_bound"] is True and goal["best_ratio_at_0.1"] == 2.5
    assert goal["best_ratio_at_0.1_met"] is False and goal["scoring_share_met"] is True


def test_report_writes_its_files(tmp_path):
    stock = {"meta": META, "rows": [_row("stock", {}, 100.0, 8, 20.0, 5.0)]}
    plugin = {"meta": {**META, "skipped": ["page-0.1 8192x1024"]},
              "rows": [_row("head-0.1", {"kv_eviction": "criticalkv", "kv_budget": 0.1}, 150.0, 16, 13.0, 5.2)]}
    (tmp_path / "rows_stock.json").write_text(json.dumps(stock))
    (tmp_path / "rows_plugin.json").write_text(json.dumps(plugin))
    assert report.main(["--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["arm"] for r in summary["rows"]] == ["stock", "plugin"]
    text = (tmp_path / "RESULTS.md").read_text()
    assert "page-0.1 8192x1024" in text and "| 8192 x 256 | plugin | head-0.1 | 150.0 |" in text
    assert (tmp_path / "throughput.png").stat().st_size > 0
