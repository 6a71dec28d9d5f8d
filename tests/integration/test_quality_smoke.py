"""Quality smoke test: the benchmark's reference runner on three needle prompts SmolLM2 answers.

Through the same code as ``benchmarks/quality/run.py --target reference`` (runner, result rows,
summary): full-cache accuracy on these prompts was 1.0 in the default sweep
(``benchmarks/quality/results/reference``), so any drop is a regression of the engine, the
model loading, the task generator or the scoring. One policy (keydiff, its default adakv
allocation) at budget 0.2 kept both single needles there (question after the context; it lost
the multi-key one even at 0.5); it must still find at least one.
"""

from __future__ import annotations

import json

import pytest

from benchmarks.quality.grid import FULL_CACHE, Point, ResultWriter
from benchmarks.quality.reference_target import run_reference
from benchmarks.quality.report import summarize
from vllm_kvevict.evaluation.tasks import make_task

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

#: (kind, seed) at 1024 tokens: uids niah_single-1024-after-0/1, niah_multikey-1024-after-1.
PROMPTS = [("niah_single", 0), ("niah_single", 1), ("niah_multikey", 1)]


def test_full_cache_accuracy_holds_and_keydiff_keeps_needles(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    tasks = [make_task(kind, tokenizer, 1024, seed) for kind, seed in PROMPTS]
    points = [FULL_CACHE, Point("keydiff", None, "head", 0.2)]
    writer = ResultWriter(tmp_path / "results.jsonl")
    done = []
    run_reference(tasks, points, writer, model_dir=smollm2_dir, protocol="context", block_size=128,
                  progress=done.append)
    writer.close()
    assert len(done) == len(tasks) * len(points)

    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    summary, flagged = summarize(rows)
    cell = {(r["policy"], r["task"], r["context_tokens"]): r for r in summary}
    full = cell[("none", "all", "all")]
    assert full["n"] == 3
    assert full["accuracy"] == 1.0, [(r["uid"], r["output"]) for r in rows if r["policy"] == "none"]
    assert not flagged
    keydiff = cell[("keydiff", "niah_single", "all")]
    assert keydiff["accuracy"] >= 0.5, [(r["uid"], r["output"]) for r in rows if r["policy"] == "keydiff"]
    assert all(0.19 <= r["memory_fraction"] <= 0.2 for r in rows if r["policy"] == "keydiff")


def test_protocol_both_writes_each_protocols_rows_from_one_prefill(smollm2_dir, tmp_path):
    """``--protocol both`` gives the rows ``context`` and ``prompt`` give alone (same outputs), from
    one prefill per prompt; a setting given twice (snapkv's default allocation is adakv) runs once;
    past its deadline the runner starts no prompt."""
    import time

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    tasks = [make_task("niah_single", tokenizer, 1024, 0)]
    points = [FULL_CACHE, Point("snapkv", None, "head", 0.2), Point("snapkv", "adakv", "head", 0.2)]

    def rows_of(name, protocol, **kw):
        writer = ResultWriter(tmp_path / name / "results.jsonl")
        run_reference(tasks, points, writer, model_dir=smollm2_dir, protocol=protocol, block_size=128,
                      progress=lambda _: None, **kw)
        writer.close()
        path = tmp_path / name / "results.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    both = rows_of("both", "both")
    alone = rows_of("context", "context") + rows_of("prompt", "prompt")
    key = lambda r: (r["protocol"], r["policy"], r["budget"])  # noqa: E731
    assert sorted(map(key, both)) == sorted(map(key, alone)) and len(both) == 4
    assert {key(r): r["output"] for r in both} == {key(r): r["output"] for r in alone}
    assert len({r["prefill_seconds"] for r in both}) == 1  # one prefill served all four rows
    assert rows_of("late", "both", deadline=time.monotonic() - 1) == []
