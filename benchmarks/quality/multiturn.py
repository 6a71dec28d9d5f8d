"""The multi-turn check: a first turn evicted with its question inside, then a follow-up.

    python benchmarks/quality/multiturn.py --base-url http://localhost:8000/v1 [--lengths 1024] [--n 4]

(``served.py`` starts the server and calls this.) Per conversation
(:mod:`vllm_kvevict.evaluation.followup`) and arm (stock vLLM: ``kv_eviction: none``, and each
``policy:granularity`` at ``--budget``), through the OpenAI chat API, greedy:

- turn 1: the context and the first question (inside the prompt the plugin evicts);
- turn 2, ``warm``: the conversation re-sent with the first reply and the follow-up, with turn 1's
  ``cache_salt`` (as a user's next request: vLLM's prefix cache may still hold turn 1's prompt
  blocks, which eviction never changes; the plugin evicts turn 2's prompt afresh with the
  follow-up inside);
- turn 2, ``cold`` (``--cold``): the same request under a salt of its own (no prefix hit), so a
  warm output can be checked against a full prefill's;
- turn 2, ``alone`` (``--cold``): the follow-up asked as a first turn on the same context (no
  conversation before it), under a salt of its own: what the follow-up scores by itself.

Rows (``OUT/results.jsonl``) carry ``turn``, ``cache``, ``prompt_tokens`` and ``cached_tokens``
(``usage.prompt_tokens_details``). ``OUT/summary.md`` / ``summary.json``: per arm, accuracy of each
turn, the share of turn 2's prompt read from the prefix cache, warm = cold outputs; and the
server's counters (``vllm:prefix_cache_hits_total`` / ``queries``, ``kvevict_requests_evicted_total``)
before and after.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vllm_kvevict.evaluation.scoring import answer_found, wilson_interval  # noqa: E402

RUN = "served-multiturn"
COUNTERS = ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total", "kvevict_requests_evicted_total")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/quality/results/served-multiturn")
    ap.add_argument("--model-dir", default=os.environ.get("KVEVICT_MODEL_DIR"))
    ap.add_argument("--kinds", default="niah_twokey,qa")
    ap.add_argument("--lengths", default="1024")
    ap.add_argument("--n", type=int, default=2, help="conversations per kind x length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policies", default="criticalkv:head,snapkv:head,keydiff:head,streamingllm:page",
                    help="policy:granularity arms besides stock vLLM")
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--no-cold", dest="cold", action="store_false", help="skip the cold turn 2 and the follow-up alone")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--time-limit", type=float, default=None)
    return ap.parse_args(argv)


def arms(policies: str, budget: float) -> list[dict]:
    """Stock vLLM, then each ``policy:granularity`` at ``budget`` (the server's default floor)."""
    out = [{"engine": "stock", "policy": "none", "granularity": "none", "budget": 1.0, "xargs": {"kv_eviction": "none"}}]
    for item in (x.strip() for x in policies.split(",") if x.strip()):
        policy, _, granularity = item.partition(":")
        if not granularity:
            raise SystemExit(f"--policies: {item!r} is not policy:granularity")
        out.append({"engine": "server", "policy": policy, "granularity": granularity, "budget": budget,
                    "xargs": {"kv_eviction": policy, "kv_budget": budget, "kv_granularity": granularity}})
    return out


def salt(*parts) -> str:
    return "kvevict-mt-" + hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:40]


def score(answers: list[str], text: str) -> float:
    return sum(answer_found(a, text) for a in answers) / len(answers)


def counters(base_url: str) -> dict:
    """Sums of :data:`COUNTERS` on the server's ``/metrics`` (every label set)."""
    import requests

    text = requests.get(base_url.rsplit("/v1", 1)[0] + "/metrics", timeout=30).text
    sums = dict.fromkeys(COUNTERS, 0.0)
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in sums:
            sums[name] += float(line.rsplit(" ", 1)[1])
    return sums


def summarize(rows: list[dict]) -> list[dict]:
    """Per arm and length: accuracy of turn 1, turn 2 warm and cold, turn 2's cached share,
    warm = cold outputs."""
    cells: dict[tuple, dict] = {}
    for r in rows:
        for length in (r["context_tokens"], "all"):
            key = (r["engine"], r["policy"], r["granularity"], r["budget"], length)
            cell = cells.setdefault(key, {"turn1": [], "warm": [], "cold": [], "alone": [], "cached": [], "pairs": {}})
            if r["turn"] == 1:
                cell["turn1"].append(r["score"])
            else:
                cell[r["cache"]].append(r["score"])
                if r["cache"] == "warm" and r["cached_tokens"] is not None:
                    cell["cached"].append(r["cached_tokens"] / r["prompt_tokens"])
                if r["cache"] in ("warm", "cold"):
                    cell["pairs"].setdefault(r["uid"], {})[r["cache"]] = r["output"].strip()
    out = []
    for (engine, policy, granularity, budget, length), c in sorted(cells.items(), key=str):
        def acc(xs):
            low, high = wilson_interval(sum(xs), len(xs))
            return {"n": len(xs), "accuracy": sum(xs) / len(xs) if xs else None, "ci_low": low, "ci_high": high}

        both = [p for p in c["pairs"].values() if len(p) == 2]
        out.append({"run": RUN, "engine": engine, "protocol": "inside", "policy": policy, "granularity": granularity,
                    "budget": budget, "context_tokens": length, "turn1": acc(c["turn1"]), "turn2_warm": acc(c["warm"]),
                    "turn2_cold": acc(c["cold"]), "followup_alone": acc(c["alone"]),
                    "turn2_cached_share": sum(c["cached"]) / len(c["cached"]) if c["cached"] else None,
                    "warm_equals_cold": [sum(p["warm"] == p["cold"] for p in both), len(both)]})
    return out


def table(summary: list[dict]) -> str:
    fmt = lambda a: "-" if a["accuracy"] is None else f"{a['accuracy']:.2f} [{a['ci_low']:.2f}, {a['ci_high']:.2f}]"  # noqa: E731
    lines = ["| engine | policy | granularity | budget | tokens | n | turn 1 | turn 2 (warm) | turn 2 (cold) | "
             "follow-up alone | turn 2 prompt from prefix cache | warm = cold |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        share = "-" if s["turn2_cached_share"] is None else f"{s['turn2_cached_share']:.2f}"
        same, n = s["warm_equals_cold"]
        lines.append(f"| {s['engine']} | {s['policy']} | {s['granularity']} | {s['budget']:g} | {s['context_tokens']} | "
                     f"{s['turn1']['n']} | {fmt(s['turn1'])} | {fmt(s['turn2_warm'])} | {fmt(s['turn2_cold'])} | "
                     f"{fmt(s['followup_alone'])} | "
                     f"{share} | {same}/{n} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    from openai import OpenAI
    from transformers import AutoTokenizer

    from vllm_kvevict.evaluation.followup import make_conversations

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    conversations = make_conversations([k for k in args.kinds.split(",") if k], tokenizer,
                                       [int(x) for x in args.lengths.split(",") if x], args.n, args.seed)
    client = OpenAI(base_url=args.base_url, api_key="EMPTY", timeout=600)
    model = client.models.list().data[0].id
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    done = {(r["uid"], r["policy"], r["granularity"], r["budget"]) for r in rows if r["turn"] == 2
            and r["cache"] == ("alone" if args.cold else "warm")}
    before = counters(args.base_url)
    deadline = None if args.time_limit is None else time.monotonic() + args.time_limit

    def ask(conversation, arm, messages, salt_value, turn, cache):
        start = time.perf_counter()
        reply = client.chat.completions.create(
            model=model, messages=messages, max_tokens=conversation.max_new_tokens, temperature=0,
            extra_body={"vllm_xargs": arm["xargs"], "cache_salt": salt_value, "continue_final_message": True,
                        "add_generation_prompt": False})
        text = reply.choices[0].message.content or ""
        details = getattr(reply.usage, "prompt_tokens_details", None)
        answers = conversation.answers if turn == 1 else conversation.followup_answers
        return {"run": RUN, "engine": arm["engine"], "policy": arm["policy"], "granularity": arm["granularity"],
                "budget": arm["budget"], "protocol": "inside", "uid": conversation.uid, "task": conversation.kind,
                "context_tokens": conversation.context_tokens, "turn": turn, "cache": cache,
                "prompt_tokens": reply.usage.prompt_tokens,
                "cached_tokens": None if details is None else details.cached_tokens,
                "score": score(answers, text), "output": text, "answers": answers,
                "seconds": round(time.perf_counter() - start, 3)}

    def converse(conversation, arm):
        if deadline is not None and time.monotonic() > deadline:
            return []
        warm = salt(RUN, conversation.uid, arm["policy"], arm["granularity"], arm["budget"])
        first = ask(conversation, arm, conversation.first_turn(), warm, 1, "cold")
        second = conversation.second_turn(first["output"])
        out = [first, ask(conversation, arm, second, warm, 2, "warm")]
        if args.cold:
            out.append(ask(conversation, arm, second, warm + "-cold", 2, "cold"))
            out.append(ask(conversation, arm, conversation.followup_alone(), warm + "-alone", 2, "alone"))
        return out

    jobs = [(c, a) for c in conversations for a in arms(args.policies, args.budget)
            if (c.uid, a["policy"], a["granularity"], a["budget"]) not in done]
    print(f"{len(conversations)} conversations x {len(arms(args.policies, args.budget))} arms, {len(jobs)} to run",
          file=sys.stderr)
    left = 0
    with open(path, "a") as fh, ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        for result in pool.map(lambda job: converse(*job), jobs):
            left += not result
            for row in result:
                fh.write(json.dumps(row) + "\n")
            fh.flush()
            rows += result
    after = counters(args.base_url)
    if left:
        print(f"--time-limit: {left} conversations not run; rerun to resume", file=sys.stderr)
    summary = summarize(rows)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    meta_path = args.out / "counters.jsonl"
    with open(meta_path, "a") as fh:
        fh.write(json.dumps({"before": before, "after": after, "conversations": len(jobs) - left}) + "\n")
    text = table(summary)
    (args.out / "summary.md").write_text(text + "\n")
    print(text)
    print("server counters (this call): " + ", ".join(f"{k} +{after[k] - before[k]:g}" for k in COUNTERS))


if __name__ == "__main__":
    main()
