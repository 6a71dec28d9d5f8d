"""Result rows carry run, engine (reference / kvpress / server / stock), protocol and n; the served
target's salts and the multi-turn summary; two-turn conversations from the real tokenizer."""

from __future__ import annotations

import json

import pytest

from benchmarks.quality.grid import ENGINES, FULL_CACHE, Point, ResultWriter, base_row, engine_of, normalized, read_rows
from benchmarks.quality.report import summarize, write_report
from benchmarks.quality.server_target import cache_salt, cached_tokens, engine_of_point


class _Task:
    kind, uid, context_tokens, prompt_ids, question_position = "niah_single", "niah_single-1024-after-0", 1024, [1], "after"


def test_new_rows_carry_run_and_an_engine_of_the_four():
    row = base_row("served", "stock", _Task, FULL_CACHE, "prompt", "none")
    assert (row["run"], row["engine"], row["protocol"]) == ("served", "stock", "prompt")
    with pytest.raises(ValueError, match="engine must be one of reference, kvpress, server, stock"):
        base_row("served", "vllm", _Task, FULL_CACHE, "prompt", "none")
    assert set(ENGINES) == {"reference", "kvpress", "server", "stock"}


def test_old_rows_get_run_from_engine_and_engine_from_the_folder_target():
    old = {"engine": "reference-kvsettings", "uid": "u"}
    assert normalized(old) == {"engine": "reference", "run": "reference-kvsettings", "uid": "u"}
    assert normalized({"engine": "lkv-bs32"}, target="reference")["engine"] == "reference"
    assert normalized({"engine": "vllm"})["engine"] == "server"  # no xargs to a plugin server: not stock
    assert normalized({"engine": "kvpress"})["engine"] == "kvpress"
    new = {"run": "served", "engine": "stock"}
    assert normalized(new) is new
    assert engine_of("anything", target="kvpress") == "kvpress"
    with pytest.raises(ValueError, match="engine of run 'mystery'"):
        engine_of("mystery")


def test_read_rows_uses_meta_json_target(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"target": "server"}))
    (tmp_path / "results.jsonl").write_text(json.dumps({"engine": "e2e", "uid": "u"}) + "\n")
    assert list(read_rows([tmp_path])) == [{"engine": "server", "run": "e2e", "uid": "u"}]


def _row(run, engine, policy, score, uid, protocol="prompt"):
    full = policy == "none"
    return {"run": run, "engine": engine, "policy": policy, "allocation": "none" if full else "adakv",
            "granularity": "none" if full else "head", "budget": 1.0 if full else 0.1, "task": "niah_single",
            "uid": uid, "context_tokens": 1024, "protocol": protocol, "score": score, "min_tokens": 0 if full else 192}


def test_summary_rows_carry_run_engine_protocol_n_and_stock_is_the_served_baseline(tmp_path):
    rows = ([_row("served", "stock", "none", 1.0, f"u{i}") for i in range(4)]
            + [_row("served", "server", "snapkv", float(i < 2), f"u{i}") for i in range(4)]
            + [_row("reference", "reference", "none", 1.0, f"u{i}", "context") for i in range(2)])
    summary, _ = summarize(rows)
    pooled = {(r["run"], r["policy"]): r for r in summary if r["task"] == "all" and r["context_tokens"] == "all"}
    stock, snapkv = pooled[("served", "none")], pooled[("served", "snapkv")]
    assert (stock["engine"], stock["protocol"], stock["n"]) == ("stock", "inside", 4)
    assert (snapkv["engine"], snapkv["protocol"], snapkv["n"], snapkv["retention"]) == ("server", "inside", 4, 0.5)
    assert pooled[("reference", "none")]["protocol"] == "after"
    resumed = ResultWriter(tmp_path / "results.jsonl")
    for r in rows:
        resumed.write(r)
    resumed.close()
    assert ResultWriter(tmp_path / "results.jsonl").has(rows[0])
    text = write_report([tmp_path], tmp_path, plot_file=False)
    assert "| served | server | snapkv | adakv | head | 0.1 | 192 | 4 | 0.500 |" in text
    assert not (tmp_path / "accuracy_vs_budget.png").exists()


def test_salt_per_setting_and_prompt_and_engine_per_point():
    a, b = Point("snapkv", None, "head", 0.1), Point("snapkv", None, "page", 0.1)
    salts = {cache_salt("served", p, uid) for p in (FULL_CACHE, a, b) for uid in ("u1", "u2")}
    assert len(salts) == 6 and all(len(s) <= 128 and "/" not in s and "@" not in s for s in salts)
    assert cache_salt("served", a, "u1") == cache_salt("served", a, "u1")
    assert cache_salt("served", a, "u1", mode="none") is None
    with pytest.raises(ValueError, match="cache_salt must be one of setting, none"):
        cache_salt("served", a, "u1", mode="user")
    assert (engine_of_point(FULL_CACHE), engine_of_point(a)) == ("stock", "server")

    class Usage:
        class prompt_tokens_details:  # noqa: N801 (the OpenAI client's attribute names)
            cached_tokens = 96

    assert cached_tokens(Usage) == 96 and cached_tokens(None) is None


def test_multiturn_summary_counts_turns_cache_share_and_warm_cold_agreement():
    from benchmarks.quality.multiturn import arms, summarize as mt_summarize

    assert [a["engine"] for a in arms("snapkv:head", 0.1)] == ["stock", "server"]
    with pytest.raises(SystemExit, match="policy:granularity"):
        arms("snapkv", 0.1)
    base = {"engine": "server", "policy": "snapkv", "granularity": "head", "budget": 0.1, "context_tokens": 1024}
    rows = []
    for i, (s1, warm, cold) in enumerate([(1.0, 1.0, 1.0), (0.0, 1.0, 0.0)]):
        uid = f"c{i}"
        rows += [dict(base, uid=uid, turn=1, cache="cold", score=s1, output="a", prompt_tokens=1000, cached_tokens=0),
                 dict(base, uid=uid, turn=2, cache="warm", score=warm, output="x", prompt_tokens=1100, cached_tokens=990),
                 dict(base, uid=uid, turn=2, cache="cold", score=cold, output="x" if cold == warm else "y",
                      prompt_tokens=1100, cached_tokens=0)]
    cell = next(s for s in mt_summarize(rows) if s["context_tokens"] == "all")
    assert cell["turn1"]["accuracy"] == 0.5 and cell["turn2_warm"]["accuracy"] == 1.0
    assert cell["turn2_cold"]["n"] == 2 and cell["turn2_cached_share"] == pytest.approx(0.9)
    assert cell["warm_equals_cold"] == [1, 2] and cell["protocol"] == "inside"
    rows.append(dict(base, uid="c0", turn=2, cache="alone", score=0.0, output="z", prompt_tokens=1000, cached_tokens=0))
    cell = next(s for s in mt_summarize(rows) if s["context_tokens"] == "all")
    assert cell["followup_alone"]["accuracy"] == 0.0 and cell["warm_equals_cold"] == [1, 2]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.parametrize("kind", ["niah_twokey", "qa"])
def test_conversation_first_turn_is_a_prefix_of_the_second_and_fits(tokenizer, kind):
    from vllm_kvevict.evaluation.followup import make_conversation

    c = make_conversation(kind, tokenizer, 1024, 0)
    assert 900 < c.first_prompt_tokens <= 1024
    first = tokenizer.apply_chat_template(c.first_turn(), tokenize=False, continue_final_message=True)
    second = tokenizer.apply_chat_template(c.second_turn(" 42."), tokenize=False, continue_final_message=True)
    assert second.startswith(first) and c.followup in second and c.followup not in first
    assert all(a in c.user for a in c.answers + c.followup_answers)  # both facts are in the context
    assert c.followup_answers != c.answers
    alone = tokenizer.apply_chat_template(c.followup_alone(), tokenize=False, continue_final_message=True)
    assert c.followup in alone and c.question not in alone and alone.endswith(c.followup_prefix)
    assert alone[:200] == first[:200]  # the same context before the question
    assert make_conversation(kind, tokenizer, 1024, 0) == c
    with pytest.raises(ValueError, match="unknown conversation kind 'vt'"):
        make_conversation("vt", tokenizer, 1024, 0)


def test_followups_change_no_task(tokenizer):
    """The follow-ups are drawn after everything else: a task of every kind is what it was."""
    from vllm_kvevict.evaluation.tasks import make_task

    task = make_task("niah_multikey", tokenizer, 512, 3)
    assert task.answers == ["2746069"]  # as before follow-ups existed and len(task.prompt_ids) <= 512
