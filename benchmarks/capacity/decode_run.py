"""Capacity over a long generation with decode-time eviction (issue 20): stock vLLM against the
plugin at a token cap and at a fraction, one fixed KV-cache size.

Every arm: one in-process engine with exactly ``--num-blocks`` blocks, ``--num-requests``
requests of ``--prompt-tokens`` random tokens submitted at once, each generating
``--max-tokens`` tokens (``ignore_eos``). Read from vLLM's own scheduler and block pool at every
step: requests running, blocks each running request holds. Reported: the most and the mean
requests running at once, blocks held per running request over time (``decode_capacity.png``),
wall time, leaked blocks. Writes ``decode_summary.json`` next to this script.

    python benchmarks/capacity/decode_run.py --model /tmp/tiny
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _arms(args) -> dict:
    page = {"scorer": args.scorer, "granularity": "page", "decode_interval": args.interval, "window": 32}
    arms = {
        "stock": None,
        f"cap {args.cap}": {**page, "budget": args.cap},
        f"fraction {args.fraction}": {**page, "budget": args.fraction},
    }
    if args.head:  # whole pages per head, Ada-KV (issue 20's head granularity)
        arms[f"head cap {args.cap}"] = {**page, "granularity": "head", "allocation": "adakv", "budget": args.cap}
    return arms


def run_arm(args, eviction) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    from vllm_kvevict.vllm.scheduler.blocks import held_block_count

    kwargs = dict(model=args.model, dtype="float32", enforce_eager=True, block_size=args.block_size,
                  num_gpu_blocks_override=args.num_blocks, max_model_len=args.prompt_tokens + args.max_tokens + 64,
                  max_num_seqs=args.num_requests, enable_prefix_caching=False, gpu_memory_utilization=0.5)
    if eviction:
        kwargs["additional_config"] = {"kv_eviction": eviction}
    llm = LLM(**kwargs)
    try:
        engine = llm.llm_engine
        sched = engine.engine_core.engine_core.scheduler
        pool = sched.kv_cache_manager.block_pool
        free0 = pool.get_num_free_blocks()
        rng = random.Random(args.seed)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
        for i in range(args.num_requests):
            prompt = [rng.randint(100, 20000) for _ in range(args.prompt_tokens)]
            engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, params)
        running, per_request, steps, started = [], [], 0, time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
            live = list(sched.running)
            running.append(len(live))
            held = [held_block_count(sched.kv_cache_manager, r.request_id) for r in live]
            per_request.append(sum(held) / len(held) if held else 0.0)
        seconds = time.perf_counter() - started
        return {"max_running": max(running), "mean_running": sum(running) / len(running), "steps": steps,
                "seconds": round(seconds, 1), "leaked": free0 - pool.get_num_free_blocks(),
                "running": running, "blocks_per_request": per_request}
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        import gc

        gc.collect()
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=False)
    for name, r in results.items():
        top.plot(r["blocks_per_request"], label=name)
        bottom.plot(r["running"], label=name)
    top.set_ylabel("blocks held per running request")
    bottom.set_ylabel("requests running")
    bottom.set_xlabel("engine step")
    top.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--num-blocks", type=int, default=200)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--scorer", default="snapkv")
    parser.add_argument("--cap", type=int, default=512)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--interval", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--head", action="store_true", help="also a head-granular arm at the cap")
    parser.add_argument("--name", default="decode", help="output files NAME_summary.json and NAME_capacity.png")
    args = parser.parse_args()
    results = {name: run_arm(args, eviction) for name, eviction in _arms(args).items()}
    for r in results.values():  # what a running request holds once long: the mean over the run's second half
        late = [b for b in r["blocks_per_request"][len(r["blocks_per_request"]) // 2 :] if b]
        r["late_blocks_per_request"] = round(sum(late) / len(late), 2) if late else 0.0
    stock = results["stock"]
    for name, r in results.items():
        if name != "stock" and r["late_blocks_per_request"]:
            # issue 20's bar: running >= 0.8 x (stock's cache per request / the plugin's) x stock's running
            r["running_target"] = round(0.8 * stock["late_blocks_per_request"] / r["late_blocks_per_request"]
                                        * stock["mean_running"], 2)
    summary = {"args": vars(args), "arms": {n: {k: v for k, v in r.items() if k not in ("running", "blocks_per_request")}
                                           for n, r in results.items()}}
    for name, r in summary["arms"].items():
        print(f"{name:>16}: max running {r['max_running']}, mean running {r['mean_running']:.1f}, "
              f"steps {r['steps']}, {r['seconds']} s, leaked {r['leaked']}, blocks per request late "
              f"{r['late_blocks_per_request']}" + (f", running target {r['running_target']}" if "running_target" in r else ""))
    (HERE / f"{args.name}_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(results, HERE / f"{args.name}_capacity.png")


if __name__ == "__main__":
    main()
