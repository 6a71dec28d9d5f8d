"""Self-recall under decode-time eviction: the model writes a long list, then is asked about an
early item of it on the same (evicted) cache (``vllm_kvevict/evaluation/self_recall.py``).

    python benchmarks/quality/self_recall.py --n 12 [--shard 0/2] [--max-seconds 480]
    python benchmarks/quality/self_recall.py --report-only

Reference engine, float32, page granularity, prompt eviction off, decode-time eviction every
``--interval`` tokens, for stock (full cache) and every policy x budget (token caps, and
fractions with ``min_tokens`` 0). Per (prompt, setting) one row in ``OUT/results.shardK.jsonl``,
written as soon as it is done: a rerun skips what is there (resumable; ``--max-seconds`` stops
between settings). Per prompt one row of ``OUT/prior.jsonl``: stock's question asked with no list
before it (the guess rate). ``--report-only`` (and every run at its end) writes the table, the plot and, for the default
``--out``, the rows of ``benchmarks/quality/summary.json`` (``self_recall_report.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vllm_kvevict.config import EvictionConfig  # noqa: E402
from vllm_kvevict.evaluation.self_recall import (  # noqa: E402
    ANSWER_TOKENS, answer_line, choose_question, followup_ids, is_correct, make_task, parse_items, prior_messages)

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "self-recall"
#: Seeds of this task start here: its prompts are made from "self-recall-{seed}" strings, which
#: no trained artifact (LKV, VECTOR: RULER kinds' "{kind}-{seed}") ever saw.
SEED_BASE = 20_000


def settings(policies, caps, fractions, interval, window) -> list[dict]:
    """Stock first, then every policy x budget (``budget`` a token cap or a fraction)."""
    out = [dict(policy="none", budget=1.0, min_tokens=0)]
    for policy in policies:
        for budget in [*caps, *fractions]:
            out.append(dict(policy=policy, budget=float(budget), min_tokens=0))
    for s in out:
        s.update(decode_interval=interval if s["policy"] != "none" else 0, window=window)
    return out


def config_of(setting: dict) -> EvictionConfig:
    if setting["policy"] == "none":
        return EvictionConfig()
    budget = setting["budget"]
    fields = dict(scorer=setting["policy"], granularity="page", budget=int(budget) if budget > 1 else budget,
                  window=setting["window"], decode_interval=setting["decode_interval"], prompt_eviction="off")
    if budget <= 1:
        fields["min_tokens"] = setting["min_tokens"]
    return EvictionConfig(**fields)


def key_of(uid: str, s: dict) -> tuple:
    return (uid, s["policy"], float(s["budget"]), int(s["min_tokens"]), int(s["decode_interval"]))


def done_keys(out: Path) -> set:
    keys = set()
    for path in out.glob("results.shard*.jsonl"):
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                keys.add(key_of(r["uid"], r))
    return keys


def run_one(engine, task, prefilled, setting: dict, block_size: int) -> dict:
    """Generate the list under ``setting``, ask about an early item of it, score the answer."""
    config = config_of(setting)
    t0 = time.time()
    gen = engine.generate(prefilled, config, task.max_new_tokens, block_size=block_size, return_state=True)
    listed = task.reply_start + gen.text
    items = parse_items(listed)
    question = choose_question(items, task.seed)
    row = dict(run="self-recall", engine="reference", uid=task.uid, seed=task.seed, policy=setting["policy"],
               allocation=config.resolved_allocation if config.enabled else "none",
               granularity=config.resolved_granularity if config.enabled else "none", budget=setting["budget"],
               min_tokens=setting["min_tokens"], decode_interval=setting["decode_interval"], window=setting["window"],
               block_size=block_size, protocol="self-recall", task="self_recall", context_tokens="all",
               prompt_tokens=len(task.prompt_ids), generated_tokens=len(gen.token_ids),
               ended_turn=gen.token_ids[-1] in engine.eos_token_ids, items=len(items),
               distinct_names=len({it.name.lower() for it in items}), decode_evictions=len(gen.decode_evictions),
               output=listed)
    if question is None:
        row.update(question=None, item_number=None, expected=None, answer="", score=0.0)
    else:
        forced = followup_ids(engine.tokenizer, question, ended_turn=row["ended_turn"])
        held_before = int(gen.state.cache.stores[0][0].length)
        answer = engine.continue_generation(gen.state, forced, ANSWER_TOKENS)
        text = engine.tokenizer.decode(answer.token_ids, skip_special_tokens=True)
        row.update(question=question.question, answer_prefix=question.answer_prefix, item_number=question.item.number,
                   expected=question.answer, answer=answer_line(text), score=float(is_correct(question, text)),
                   held_at_question=held_before, followup_tokens=len(forced),
                   decode_evictions=len(gen.decode_evictions) + len(answer.decode_evictions))
    row["wall_s"] = round(time.time() - t0, 2)
    return row


def prior_row(engine, task, stock: dict) -> dict:
    """Stock's question asked with no list before it: right by guessing?"""
    from vllm_kvevict.evaluation.scoring import answer_found
    from vllm_kvevict.evaluation.self_recall import Item, Question

    q = Question(Item(stock["item_number"], "", "", ""), stock["question"], stock["answer_prefix"])
    text = engine.tokenizer.apply_chat_template(prior_messages(q), tokenize=False, continue_final_message=True)
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    gen = engine.generate(engine.prefill(ids, keep_queries=1), EvictionConfig(), ANSWER_TOKENS)
    answer = answer_line(gen.text)
    return dict(uid=task.uid, seed=task.seed, question=stock["question"], expected=stock["expected"], answer=answer,
                score=float(answer_found(stock["expected"], answer)))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--n", type=int, default=12, help="prompts (seeds SEED_BASE + 0 .. n-1)")
    ap.add_argument("--seed-base", type=int, default=SEED_BASE)
    ap.add_argument("--policies", default="snapkv,keydiff,streamingllm")
    ap.add_argument("--caps", default="128,256", help="token caps (comma-separated)")
    ap.add_argument("--fractions", default="0.2", help="fractional budgets, min_tokens 0 (comma-separated)")
    ap.add_argument("--interval", type=int, default=64, help="decode_interval")
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--items", type=int, default=40, help="items the prompt asks for")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="tokens of the list (it may end sooner)")
    ap.add_argument("--shard", default="0/1", help="i/k: this process runs prompts i, i+k, ...")
    ap.add_argument("--max-seconds", type=float, default=0, help="stop between settings after this long (0: never)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--model", default=os.environ.get("KVEVICT_MODEL_DIR"))
    args = ap.parse_args(argv)
    from benchmarks.quality.self_recall_report import SUMMARY, write_report

    summary = SUMMARY if args.out.resolve() == DEFAULT_OUT.resolve() else None
    if args.report_only:
        print(write_report(args.out, summary))
        return
    if not args.model:
        ap.error("--model (or KVEVICT_MODEL_DIR) is required")
    shard, shards = (int(x) for x in args.shard.split("/"))
    if not 0 <= shard < shards:
        ap.error(f"--shard must be i/k with 0 <= i < k, got {args.shard!r}")
    import torch

    from vllm_kvevict.reference import ReferenceEngine

    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    grid = settings(args.policies.split(","), [int(c) for c in args.caps.split(",") if c],
                    [float(f) for f in args.fractions.split(",") if f], args.interval, args.window)
    for s in grid:
        config_of(s)  # a bad setting fails here, before any work
    (args.out / "meta.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=1))
    engine = ReferenceEngine(args.model)
    done = done_keys(args.out)
    start = time.time()
    results = args.out / f"results.shard{shard}.jsonl"
    for i in range(shard, args.n, shards):
        task = make_task(engine.tokenizer, args.seed_base + i, args.items, args.max_new_tokens)
        todo = [s for s in grid if key_of(task.uid, s) not in done]
        prefilled = engine.prefill(task.prompt_ids, keep_queries=args.window) if todo else None
        for s in todo:
            if args.max_seconds and time.time() - start > args.max_seconds:
                print(f"stopping after {time.time() - start:.0f} s (resumable)")
                return
            row = run_one(engine, task, prefilled, s, args.block_size)
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{task.uid} {s['policy']} {s['budget']:g}: gen {row['generated_tokens']} items {row['items']} "
                  f"q={row['question']!r} expected={row['expected']!r} answer={row['answer']!r} "
                  f"score={row['score']} {row['wall_s']} s", flush=True)
        stock = [r for r in read_jsonl(results) if r["uid"] == task.uid and r["policy"] == "none"]
        priors = args.out / "prior.jsonl"
        if stock and stock[0]["question"] is not None and task.uid not in {r["uid"] for r in read_jsonl(priors)}:
            with priors.open("a") as f:
                f.write(json.dumps(prior_row(engine, task, stock[0])) + "\n")
    print(write_report(args.out, summary))


if __name__ == "__main__":
    main()
