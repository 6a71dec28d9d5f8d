"""Send long-context needle questions to a running `vllm serve` with the plugin, and show what
eviction saved: the answers, their correctness, and the plugin's and vLLM's own metrics.

Each question goes twice: once with the server's default policy, once opted out per request
(`vllm_xargs: {"kv_eviction": "none"}`), so the savings and the answers can be compared. Each
copy has its own `cache_salt` (vLLM's per-request prefix-cache isolation), so the second never
hits the first's cached prompt blocks and both times are a full prefill.

    python scripts/demo_request.py --base-url http://127.0.0.1:8000 --n 3 --tokens 3000
"""

from __future__ import annotations

import argparse
import re
import time

import requests
from openai import OpenAI
from transformers import AutoTokenizer

from vllm_kvevict.evaluation.scoring import score
from vllm_kvevict.evaluation.tasks import make_task

METRIC_LINE = re.compile(r"^(kvevict_[a-z_]+?)(?:_total)?(?:\{[^}]*\})?\s+([0-9.eE+-]+)$")


def kvevict_totals(base_url: str) -> dict[str, float]:
    """Sum of every ``kvevict_*`` counter series on ``/metrics`` (histogram sums/counts included)."""
    text = requests.get(f"{base_url}/metrics", timeout=10).text
    totals: dict[str, float] = {}
    for line in text.splitlines():
        m = METRIC_LINE.match(line)
        if m and not line.startswith("#"):
            totals[m.group(1)] = totals.get(m.group(1), 0.0) + float(m.group(2))
    return totals


def ask(client: OpenAI, model: str, prompt_ids: list[int], max_tokens: int, xargs: dict | None, salt: str):
    t0 = time.perf_counter()
    body: dict = {"cache_salt": salt}
    if xargs:
        body["vllm_xargs"] = xargs
    out = client.completions.create(
        model=model,
        prompt=prompt_ids,
        max_tokens=max_tokens,
        temperature=0.0,
        extra_body=body,
    )
    return out.choices[0].text, out.usage.prompt_tokens, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", required=True, help="served model name (the model folder)")
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--kind", default="niah_single")
    parser.add_argument("--question-position", default="both", choices=["after", "both"])
    args = parser.parse_args()

    client = OpenAI(base_url=f"{args.base_url}/v1", api_key="unused")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    right = {"evicted": 0.0, "full": 0.0}
    for i in range(args.n):
        task = make_task(args.kind, tokenizer, args.tokens, seed=i, question_position=args.question_position)
        before = kvevict_totals(args.base_url)
        text, prompt_tokens, secs = ask(client, args.model, task.prompt_ids, task.max_new_tokens, None, f"evict-{i}")
        after = kvevict_totals(args.base_url)
        full_text, _, full_secs = ask(client, args.model, task.prompt_ids, task.max_new_tokens, {"kv_eviction": "none"},
                                     f"whole-{i}")
        right["evicted"] += score(task, text)
        right["full"] += score(task, full_text)
        evicted = after.get("kvevict_tokens_evicted", 0) - before.get("kvevict_tokens_evicted", 0)
        returned = after.get("kvevict_blocks_returned", 0) - before.get("kvevict_blocks_returned", 0)
        print(f"[{i}] {prompt_tokens} prompt tokens; expected {task.answers}")
        print(f"    with eviction ({secs:.1f} s, no prefix-cache hit): {text.strip()[:80]!r}")
        print(f"    opted out     ({full_secs:.1f} s, no prefix-cache hit): {full_text.strip()[:80]!r}")
        print(f"    token positions evicted: {evicted:.0f} of {prompt_tokens}"
              f" ({evicted / max(prompt_tokens, 1):.0%} of the cache freed); blocks returned to vLLM: {returned:.0f}")
    print(f"accuracy with eviction {right['evicted'] / args.n:.2f}, opted out {right['full'] / args.n:.2f} (n={args.n})")
    totals = kvevict_totals(args.base_url)
    print("kvevict_ metrics now: " + ", ".join(f"{k}={v:g}" for k, v in sorted(totals.items())))


if __name__ == "__main__":
    main()
