"""The demo and the study runner, end to end on the tiny random Llama (its answers are noise:
these check the plumbing, protocols and memory accounting, not accuracy)."""

from __future__ import annotations

import json

import pytest

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.evaluation.tasks import make_task
from vllm_kvevict.reference import demo, study
from vllm_kvevict.reference.engine import ReferenceEngine

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # one torch thread: see conftest


def test_run_task_compresses_what_each_protocol_says(tiny_llama_dir):
    engine = ReferenceEngine(tiny_llama_dir)
    task = make_task("niah_single", engine.tokenizer, 400, seed=3)
    tokens = EvictionConfig(scorer="snapkv", budget=0.5, min_tokens=0, granularity="head", head_selection="token")
    configs = [EvictionConfig(), tokens]
    runs = study.run_task(engine, task, configs, ["inside", "after"])
    assert [(r.protocol, r.policy) for r in runs] == [
        ("inside", "full"),
        ("inside", "snapkv/adakv/head/head_selection=token/min_tokens=0"),
        ("after", "full"),
        ("after", "snapkv/adakv/head/head_selection=token/min_tokens=0"),
    ]
    inside, after = runs[1], runs[3]
    assert inside.compressed_tokens == len(task.prompt_ids)
    assert after.compressed_tokens == task.context_end < len(task.prompt_ids)
    assert inside.memory_fraction == pytest.approx(int(0.5 * len(task.prompt_ids)) / len(task.prompt_ids))
    assert after.memory_fraction == pytest.approx(int(0.5 * task.context_end) / task.context_end)
    # At full cache both protocols run the same computation.
    assert runs[0].output == runs[2].output
    rows = study.summarize(runs)
    assert {(r["protocol"], r["n"]) for r in rows} == {("inside", 1), ("after", 1)}
    json.dumps([r.to_json() for r in runs])


def test_demo_prints_accuracy_and_memory(tiny_llama_dir, capsys):
    code = demo.main(["--model", str(tiny_llama_dir), "--policy", "snapkv", "--budget", "0.5", "--n", "1",
                      "--length", "500", "--block-size", "32"])
    assert code == 0
    out = capsys.readouterr().out
    assert "snapkv/adakv/head" in out and "accuracy" in out
    row = next(line for line in out.splitlines() if line.startswith("inside   snapkv"))
    # whole 32-token pages per head: the budget rounds up to a page (and the prompt's tokens vary);
    # 500 tokens: half of them is above the default floor of 192
    assert 0.45 <= float(row.split()[-1]) <= 0.5 + 32 / 450


def test_demo_rejects_a_bad_budget(tiny_llama_dir, capsys):
    assert demo.main(["--model", str(tiny_llama_dir), "--budget", "2.5"]) == 2
    assert "budget" in capsys.readouterr().err


def test_study_policy_specs_and_names():
    from vllm_kvevict.config import EvictionConfig
    from vllm_kvevict.reference.study import parse_policy, policy_name

    assert parse_policy("snapkv") == ("snapkv", {})
    scorer, overrides = parse_policy("criticalkv:allocation=uniform, rho=0.8")
    assert (scorer, overrides) == ("criticalkv", {"allocation": "uniform", "rho": "0.8"})
    config = EvictionConfig(scorer=scorer, budget=0.25, min_tokens=0, granularity="head", **overrides)
    assert policy_name(config) == "criticalkv/uniform/head/min_tokens=0/rho=0.8"
    assert policy_name(EvictionConfig(scorer="snapkv", budget=0.25)) == "snapkv/adakv/head"
    assert policy_name(EvictionConfig(scorer="snapkv", budget=1.0)) == "full"
    with pytest.raises(ValueError, match="key=value"):
        parse_policy("criticalkv:rho")
