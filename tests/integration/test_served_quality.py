"""benchmarks/quality/served.py end to end on one real `vllm serve` (tiny random Llama): the grid
through the OpenAI API (stock and plugin rows, each setting's own prefill) and the multi-turn
check (turn 2 reads turn 1's prompt blocks from the prefix cache and answers as a cold prefill)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("openai")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tiny_llama_dir, tmp_path_factory):
    from benchmarks.quality import served

    out = tmp_path_factory.mktemp("served")
    served.main(["--model-dir", str(tiny_llama_dir), "--out", str(out / "grid"), "--multiturn-out", str(out / "mt"),
                 "--kinds", "niah_single", "--lengths", "512", "--n-per", "1", "--policies", "snapkv",
                 "--granularities", "page,head", "--budgets", "0.1", "--multiturn-n", "1",
                 "--multiturn-lengths", "512", "--multiturn-policies", "snapkv:head", "--kv-cache-bytes",
                 str(64 * 2**20), "--concurrency", "2"])
    read = lambda path: [json.loads(line) for line in path.read_text().splitlines()]  # noqa: E731
    return read(out / "grid" / "results.jsonl"), read(out / "mt" / "results.jsonl"), out


def test_grid_rows_stock_and_server_each_with_its_own_prefill(served):
    rows, _, _ = served
    assert sorted((r["engine"], r["policy"], r["granularity"]) for r in rows) == [
        ("server", "snapkv", "head"), ("server", "snapkv", "page"), ("stock", "none", "none")]
    assert {r["run"] for r in rows} == {"served"} and {r["protocol"] for r in rows} == {"prompt"}
    assert all(r["cached_tokens"] == 0 for r in rows), [r["cached_tokens"] for r in rows]
    assert len({r["cache_salt"] for r in rows}) == 3
    assert {r["min_tokens"] for r in rows if r["engine"] == "server"} == {192}  # the server's default floor


def test_multiturn_second_turn_hits_the_first_turns_blocks_and_matches_a_cold_prefill(served):
    _, rows, out = served
    assert {(r["engine"], r["task"]) for r in rows} == {(e, k) for e in ("stock", "server") for k in ("niah_twokey", "qa")}
    first = {(r["uid"], r["engine"]): r for r in rows if r["turn"] == 1}
    for warm in (r for r in rows if r["turn"] == 2 and r["cache"] == "warm"):
        cold = next(r for r in rows if r["turn"] == 2 and r["cache"] == "cold" and r["uid"] == warm["uid"]
                    and r["engine"] == warm["engine"])
        turn1 = first[(warm["uid"], warm["engine"])]
        assert turn1["cached_tokens"] == 0 and cold["cached_tokens"] == 0
        # every full block of turn 1's prompt but the one its window needs recomputed
        assert warm["cached_tokens"] >= (turn1["prompt_tokens"] // 32 - 2) * 32, (warm, turn1)
        assert warm["output"] == cold["output"], (warm["output"], cold["output"])
    summary = json.loads((out / "mt" / "summary.json").read_text())
    assert {s["engine"] for s in summary} == {"stock", "server"}
    counters = json.loads((out / "mt" / "counters.jsonl").read_text().splitlines()[-1])
    assert counters["after"]["kvevict_requests_evicted_total"] > counters["before"]["kvevict_requests_evicted_total"]
