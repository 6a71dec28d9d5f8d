"""Decode speed on CPU: head-granular eviction against stock decode, side by side in one engine.

One in-process vLLM-CPU engine with the plugin and the main job's settings (float32, block size
32, 1 GiB of KV cache, ``benchmarks/overhead/run.py``'s engine) serves, per prompt length and
concurrency, ``c`` requests of each arm one arm after another: ``none`` (opted out per request:
stock decode) and every scorer at head granularity. Every prompt is a distinct random token
sequence with its own ``cache_salt`` (no prefix-cache hits), ``ignore_eos``, ``max_tokens``
tokens each.

The engine is stepped by hand; the decode phase is the steps after every request of the arm has
its first two tokens (its prompt is prefilled, scored and compacted, and it has decoded once
from its compact region), up to the last. Over those steps

    decode_tokens_per_s = concurrency / median step seconds   (every decode step adds one token
                                                              to each of the c requests)
    decode_ratio        = an arm's decode_tokens_per_s / none's at the same length and concurrency

The median, not the mean (``mean_tokens_per_s``, also written): on this shared 2-core machine
other users' unlocked jobs stall a step now and then (OpenMP threads descheduled), and one such
burst in one arm would decide its mean. Arms run in rounds (``--rounds``, each round every arm
once, in turn) and an arm's steps of every round are pooled. Only steps in which every request
of the arm decoded count (the KV cache, 2 GiB by default, holds all of them at once).

With ``--torch-arms`` every scorer runs a second time with ``KVEVICT_CPU_HEAD_DECODE=torch`` set
for its requests (``path: torch``): every compacted row through the torch two-segment path after
the stock kernel over its tail, as main did before issue 14; ``path: stock-op`` is the default.

``stock_op_calls`` counts the layer calls of vLLM's own op on single-head pages
(``backends/cpu_head_pages``) over the arm (0 where that module is absent: main before issue 14).
Prints a table; merges its rows into ``summary.json`` (the scoring rows of ``run.py`` are kept),
writes its table into ``RESULTS.md`` (between its markers) and ``decode_ratio.png``.

    flock /tmp/kvevict-heavy.lock python benchmarks/overhead/decode.py --torch-arms --max-tokens 64  # ~10 min
    python benchmarks/overhead/decode.py --prompt-tokens 2048 --concurrency 1 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from run import _csv, _policy  # noqa: E402

TARGET_RATIO = 0.90
SWITCH = "KVEVICT_CPU_HEAD_DECODE"
PATHS = {"": "stock-op", "torch": "torch"}
MARK_START, MARK_END = "<!-- decode-table:start -->", "<!-- decode-table:end -->"


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=os.environ.get("KVEVICT_MODEL_DIR"))
    p.add_argument("--prompt-tokens", default="2048,4096")
    p.add_argument("--concurrency", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--scorers", default="criticalkv,snapkv")
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=1, help="every arm this many times, in turn; steps pooled")
    p.add_argument("--torch-arms", action="store_true", help="also every scorer through the torch path")
    p.add_argument("--kv-cache-gib", type=float, default=2.0,
                   help="KV cache size: 8 stock requests of 4k tokens + 128 need ~1.5 GiB (46 KB a token)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="vLLM's default if unset")
    p.add_argument("--label", default="", help="a name for this run in summary.json")
    p.add_argument("--out", type=Path, default=HERE)
    return p.parse_args(argv)


class OpCalls:
    """Counts calls of ``cpu_head_pages.attend_head_pages`` (the engine runs in this process)."""

    def __init__(self) -> None:
        self.count = 0
        try:
            from vllm_kvevict.vllm.backends import cpu_head_pages
        except ImportError:
            return
        original = cpu_head_pages.attend_head_pages

        def counted(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        cpu_head_pages.attend_head_pages = counted


class DecodeBench:
    def __init__(self, llm, max_tokens: int) -> None:
        self.llm, self.max_tokens, self.seed, self.calls = llm, max_tokens, 5000, OpCalls()

    def run(self, policy: dict | None, tokens: int, concurrency: int, switch: str = "") -> dict:
        """One arm; ``switch``: ``KVEVICT_CPU_HEAD_DECODE`` while it runs (read by the backend every
        step, the engine being in this process)."""
        previous = os.environ.get(SWITCH)
        os.environ[SWITCH] = switch
        try:
            return self._run(policy, tokens, concurrency)
        finally:
            if previous is None:
                os.environ.pop(SWITCH, None)
            else:
                os.environ[SWITCH] = previous

    def _run(self, policy: dict | None, tokens: int, concurrency: int) -> dict:
        from vllm import SamplingParams

        from vllm_kvevict.vllm.inprocess import random_prompt

        engine = self.llm.llm_engine
        extra = dict(policy) if policy else {"kv_eviction": "none"}
        params = SamplingParams(max_tokens=self.max_tokens, temperature=0.0, ignore_eos=True, extra_args=extra)
        produced = {}
        for _ in range(concurrency):
            self.seed += 1
            req_id = f"decode-{self.seed}"
            engine.add_request(req_id, {"prompt_token_ids": random_prompt(tokens, seed=self.seed),
                                        "cache_salt": f"decode-{self.seed}"}, params)
            produced[req_id] = 0
        calls0, decode_s, decode_tokens, step_seconds = self.calls.count, 0.0, 0, []
        while engine.has_unfinished_requests():
            decoding = all(n >= 2 for n in produced.values())
            started = time.perf_counter()
            outs = engine.step()
            seconds = time.perf_counter() - started
            new = 0
            for out in outs:
                req_id = out.request_id if out.request_id in produced else out.request_id.rpartition("-")[0]
                if req_id in produced:
                    count = len(out.outputs[0].token_ids)
                    new += count - produced[req_id]
                    produced[req_id] = count
            if decoding and new == concurrency:
                decode_s, decode_tokens = decode_s + seconds, decode_tokens + new
                step_seconds.append(seconds)
        if any(n != self.max_tokens for n in produced.values()):
            raise RuntimeError(f"requests ended early: {produced}")
        return {"decode_tokens": decode_tokens, "decode_seconds": decode_s, "step_seconds": step_seconds,
                "stock_op_calls": self.calls.count - calls0}


def pooled(runs: list[dict], concurrency: int) -> dict:
    """An arm's rounds as one row: its decode steps pooled, tokens/s from the median step."""
    steps = sorted(s for run in runs for s in run["step_seconds"])
    if not steps:
        raise RuntimeError(f"no decode step ran all {concurrency} requests together (KV cache too small?)")
    median = steps[len(steps) // 2]
    seconds, tokens = sum(r["decode_seconds"] for r in runs), sum(r["decode_tokens"] for r in runs)
    return {"decode_steps": len(steps), "decode_tokens": tokens, "decode_seconds": seconds,
            "median_step_seconds": median, "decode_tokens_per_s": concurrency / median,
            "mean_tokens_per_s": tokens / seconds if seconds else 0.0,
            "stock_op_calls": sum(r["stock_op_calls"] for r in runs)}


def _engine(args, max_seqs: int):
    """run.py's engine with a KV cache that holds every stock request at once (at 1 GiB, 8 x 4k
    stock requests do not all run together, and stock then decodes a smaller batch)."""
    from vllm_kvevict.vllm.inprocess import open_llm

    options = dict(max_model_len=8192, block_size=32, kv_cache_memory_bytes=int(args.kv_cache_gib * (1 << 30)),
                   max_num_seqs=max_seqs,
                   additional_config={"kv_eviction": {"scorer": "criticalkv", "budget": args.budget}})
    if args.max_num_batched_tokens:
        options["max_num_batched_tokens"] = args.max_num_batched_tokens
    return open_llm(args.model, **options)


def main(argv=None) -> int:
    args = _args(argv)
    if not args.model:
        raise SystemExit("--model or KVEVICT_MODEL_DIR")
    import torch

    lengths = [int(x) for x in _csv(args.prompt_tokens)]
    concurrencies = [int(x) for x in _csv(args.concurrency)]
    rows, started = [], time.perf_counter()
    with _engine(args, max(concurrencies)) as llm:
        bench = DecodeBench(llm, args.max_tokens)
        bench.run(None, 512, 1)  # warm-up: the first forwards of an engine are slow
        bench.run(_policy("criticalkv", "head", args.budget), 512, 1)
        for concurrency in concurrencies:
            for tokens in lengths:
                arms = [("none", None, "")] + [(s, _policy(s, "head", args.budget), switch)
                                               for switch in (("", "torch") if args.torch_arms else ("",))
                                               for s in _csv(args.scorers)]
                runs = {i: [] for i in range(len(arms))}
                for _ in range(args.rounds):
                    for i, (_, policy, switch) in enumerate(arms):
                        runs[i].append(bench.run(policy, tokens, concurrency, switch))
                base = pooled(runs[0], concurrency)
                for i, (scorer, policy, switch) in enumerate(arms):
                    row = pooled(runs[i], concurrency)
                    row["decode_ratio"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
                    rows.append(dict(scorer=scorer, granularity="head" if policy else "-",
                                     path=PATHS[switch] if policy else "stock", prompt_tokens=tokens,
                                     concurrency=concurrency, **row))
                    print_row(rows[-1])
    decode = {"label": args.label, "model": Path(args.model).name, "budget": args.budget,
              "max_tokens": args.max_tokens, "rounds": args.rounds, "target_ratio": TARGET_RATIO,
              "head_decode_switch": os.environ.get(SWITCH, ""),
              "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "seconds": round(time.perf_counter() - started, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {"rows": []}
    summary["rows"] = [r for r in summary["rows"] if "decode_ratio" not in r] + rows
    summary["decode"] = decode
    path.write_text(json.dumps(summary, indent=1) + "\n")
    _write_results(args.out / "RESULTS.md", decode, rows)
    _plot(args.out / "decode_ratio.png", decode, rows)
    print(f"wrote {path} ({decode['seconds']} s)")
    return 0


HEADER = ("scorer", "granularity", "path", "prompt_tokens", "concurrency", "decode_steps", "median_step_ms",
          "decode_tok_per_s", "mean_tok_per_s", "decode_ratio", "stock_op_calls")


def _cells(row: dict) -> list[str]:
    ratio = f"{row['decode_ratio']:.2f}"
    if row["scorer"] != "none":
        ratio += " ok" if row["decode_ratio"] >= TARGET_RATIO else " UNDER"
    return [row["scorer"], row["granularity"], row.get("path", "-"), str(row["prompt_tokens"]), str(row["concurrency"]),
            str(row["decode_steps"]), f"{row['median_step_seconds'] * 1000:.1f}", f"{row['decode_tokens_per_s']:.2f}",
            f"{row['mean_tokens_per_s']:.2f}", ratio, str(row["stock_op_calls"])]


def print_row(row: dict) -> None:
    print("  ".join(f"{c:>12}" for c in _cells(row)), flush=True)


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return "\n".join(lines + ["| " + " | ".join(_cells(row)) + " |" for row in rows])


def _write_results(path: Path, decode: dict, rows: list[dict]) -> None:
    switch = f", {SWITCH}={decode['head_decode_switch']}" if decode["head_decode_switch"] else ""
    block = (f"{MARK_START}\nRun `{decode['label'] or 'latest'}`: {decode['model']}, budget {decode['budget']}, "
             f"{decode['max_tokens']} tokens per request, {decode['rounds']} round(s), "
             f"{decode['torch_threads']} torch threads on "
             f"{decode['cpus']} CPUs{switch}, {decode['seconds']} s (`benchmarks/overhead/decode.py`; target: "
             f"decode_ratio >= {decode['target_ratio']:.2f}).\n\n{table(rows)}\n{MARK_END}")
    text = path.read_text() if path.exists() else "# Eviction overhead on CPU\n\n"
    if MARK_START not in text:
        text += f"\n## Decode speed at head granularity\n\n{MARK_START}\n{MARK_END}\n"
    head, _, rest = text.partition(MARK_START)
    _, _, tail = rest.partition(MARK_END)
    path.write_text(head + block + tail)


def _plot(path: Path, decode: dict, rows: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    arms = [r for r in rows if r["scorer"] != "none"]
    settings = list(dict.fromkeys((r["prompt_tokens"], r["concurrency"]) for r in arms))
    scorers = list(dict.fromkeys((r["scorer"], r.get("path", "-")) for r in arms))
    fig, ax = plt.subplots(figsize=(max(6, len(settings) * 1.4), 4))
    width = 0.8 / max(1, len(scorers))
    for i, scorer in enumerate(scorers):
        ratios = [next((r["decode_ratio"] for r in arms if (r["scorer"], r.get("path", "-")) == scorer
                        and (r["prompt_tokens"], r["concurrency"]) == s), 0) for s in settings]
        ax.bar([x + i * width for x in range(len(settings))], ratios, width, label=f"{scorer[0]} head, {scorer[1]}")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.axhline(decode["target_ratio"], color="red", linestyle="--", label="target")
    ax.set_xticks([x + width * (len(scorers) - 1) / 2 for x in range(len(settings))],
                  [f"{t} tokens\n{c} stream{'s' if c > 1 else ''}" for t, c in settings])
    ax.set_ylabel("decode tokens/s / stock's")
    ax.set_title(f"{decode['model']} on CPU, budget {decode['budget']} ({decode['label'] or 'latest'})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
