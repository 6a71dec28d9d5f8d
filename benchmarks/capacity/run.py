"""Capacity at a fixed KV-cache size: stock vLLM against vLLM with the plugin.

For each configuration, one engine with exactly ``--num-blocks`` KV blocks runs in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that the scheduler and vLLM's own block pool can be read
directly (never the plugin's bookkeeping):

* memory: one long request alone; blocks it holds once eviction has run = the pool's free count
  before it arrived minus the free count after its first decode steps; ideal = ceil(budget x
  prompt blocks) + the blocks of its generated tokens (EVALUATION.md's rule,
  ``cache.accounting.ideal_blocks``); efficiency = ideal / held;
* capacity: ``--num-requests`` long requests submitted at once; the largest number running at
  the same time over the run, and output tokens per second.

Prints a table and writes ``summary.json`` (and ``results.jsonl``) next to this script.

    python benchmarks/capacity/run.py                      # SmolLM2, 2k prompts, budget 0.1
    python benchmarks/capacity/run.py --model /tmp/tiny --prompt-tokens 2048 --num-blocks 1024
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _engine(model: str, num_blocks: int, block_size: int, eviction: dict | None, max_num_seqs: int, max_model_len: int,
            max_num_batched_tokens: int | None = None):
    from vllm import LLM

    kwargs = dict(
        model=model,
        dtype="float32",
        enforce_eager=True,
        max_model_len=max_model_len,
        num_gpu_blocks_override=num_blocks,
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        enable_prefix_caching=False,  # distinct prompts anyway; keeps the pool counts exact
        gpu_memory_utilization=0.5,
    )
    if max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = max_num_batched_tokens
    if eviction:
        kwargs["additional_config"] = {"kv_eviction": eviction}
    return LLM(**kwargs)


def _scheduler(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def _prompts(model: str, n: int, tokens: int, seed: int) -> list[list[int]]:
    """Distinct token sequences of exactly ``tokens`` tokens (ordinary text, no prefix sharing)."""
    import random

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    rng = random.Random(seed)
    words = "river stone light garden window paper music winter silver forest ocean story road".split()
    prompts = []
    for i in range(n):
        text = f"Document {i}. " + " ".join(rng.choice(words) for _ in range(tokens * 2))
        ids = tok(text, add_special_tokens=False).input_ids[: tokens - 1]
        prompts.append([tok.bos_token_id or 1] + ids)
    return prompts


def run_one(args, eviction: dict | None) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    max_model_len = args.prompt_tokens + args.max_tokens + args.block_size
    llm = _engine(args.model, args.num_blocks, args.block_size, eviction, args.max_num_seqs, max_model_len,
                  args.max_num_batched_tokens)
    sched = _scheduler(llm)
    pool = sched.kv_cache_manager.block_pool
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)

    # Memory: one request alone.
    (single,) = _prompts(args.model, 1, args.prompt_tokens, seed=1234)
    free_start = pool.get_num_free_blocks()
    engine.add_request("mem-0", TokensPrompt(prompt_token_ids=single), params)
    held_after = tokens_at_measure = None
    steps_after_prefill = 0
    while engine.has_unfinished_requests():
        engine.step()
        req = sched.running[0] if sched.running else None  # vLLM suffixes request ids
        if req is not None and req.num_computed_tokens >= len(single):
            steps_after_prefill += 1
            if steps_after_prefill == 3:  # scored after prefill, compacted/freed in the next steps
                held_after = free_start - pool.get_num_free_blocks()
                tokens_at_measure = req.num_tokens
    free_end = pool.get_num_free_blocks()

    # Capacity: many requests at once.
    prompts = _prompts(args.model, args.num_requests, args.prompt_tokens, seed=args.seed)
    for i, p in enumerate(prompts):
        engine.add_request(f"cap-{i}", TokensPrompt(prompt_token_ids=p), params)
    max_running = 0
    t0 = time.perf_counter()
    out_tokens = 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        max_running = max(max_running, len(sched.running))
        out_tokens += sum(len(o.outputs[0].token_ids) for o in outputs if o.finished)
    seconds = time.perf_counter() - t0
    prompt_blocks = math.ceil(args.prompt_tokens / args.block_size)
    return {
        "blocks_held": held_after,
        "tokens_at_measure": tokens_at_measure,
        "prompt_blocks": prompt_blocks,
        "free_start": free_start,
        "free_end": free_end,
        "max_running": max_running,
        "seconds": round(seconds, 2),
        "output_tokens_per_s": round(out_tokens / seconds, 2) if seconds else None,
    }


def _child(args) -> None:
    eviction = json.loads(args.child_eviction) if args.child_eviction != "none" else None
    result = run_one(args, eviction)
    print("RESULT " + json.dumps(result), flush=True)


def _spawn(args, eviction: dict | None) -> dict:
    """One engine per configuration, each in a fresh process (memory is returned in between)."""
    cmd = [sys.executable, __file__, "--child-eviction", json.dumps(eviction) if eviction else "none"]
    for key in ("model", "prompt_tokens", "num_blocks", "block_size", "num_requests", "max_tokens", "max_num_seqs", "seed",
                "max_num_batched_tokens"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
    raise SystemExit(f"configuration {eviction} failed (exit {proc.returncode})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("KVEVICT_MODEL_DIR"))
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--num-blocks", type=int, default=640, help="KV-cache size in blocks, same for every run")
    parser.add_argument("--block-size", type=int, default=32, help="vLLM CPU needs a multiple of 32 (its default is 128)")
    parser.add_argument("--num-requests", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=0,
                        help="tokens per step (0: vLLM's default); prompts admitted per step = this / prompt tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policies", default="snapkv", help="comma-separated scorers")
    parser.add_argument("--budgets", default="0.1", help="comma-separated budgets")
    parser.add_argument("--granularities", default="page", help="comma-separated: page, head")
    parser.add_argument("--out", default=str(HERE))
    parser.add_argument("--child-eviction", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_eviction is not None:
        return _child(args)

    from vllm_kvevict.cache import ideal_blocks
    from vllm_kvevict.config import EvictionConfig

    stock = _spawn(args, None)
    rows = []
    for granularity, policy, budget in (
        (g, p, float(b)) for g in args.granularities.split(",") for p in args.policies.split(",") for b in args.budgets.split(",")
    ):
        ev = {"scorer": policy, "budget": budget, "granularity": granularity}
        config = EvictionConfig(**ev)
        got = _spawn(args, ev)
        ideal = ideal_blocks(config, args.prompt_tokens, got["tokens_at_measure"], args.block_size)
        rows.append({
            "policy": policy,
            "allocation": config.resolved_allocation,
            "granularity": granularity,
            "head_selection": config.head_selection_for(args.block_size) if granularity == "head" else None,
            "budget": budget,
            "prompt_tokens": args.prompt_tokens,
            "blocks_held": got["blocks_held"],
            "blocks_ideal": round(ideal, 2),
            "efficiency": round(ideal / got["blocks_held"], 3) if got["blocks_held"] else None,
            "max_running_stock": stock["max_running"],
            "max_running_plugin": got["max_running"],
            "capacity_ratio": round(got["max_running"] / stock["max_running"], 2),
            "capacity_target": round(0.8 / budget, 2),
            "blocks_held_stock": stock["blocks_held"],
            "leaked_blocks": got["free_start"] - got["free_end"],
            "num_blocks": args.num_blocks,
            "num_requests": args.num_requests,
            "output_tokens_per_s_stock": stock["output_tokens_per_s"],
            "output_tokens_per_s_plugin": got["output_tokens_per_s"],
        })
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "summary.json"
    previous = json.loads(summary_path.read_text()) if summary_path.exists() else []
    keys = {(r["policy"], r["granularity"], r["budget"], r["prompt_tokens"]) for r in rows}
    kept = [r for r in previous if (r["policy"], r["granularity"], r["budget"], r["prompt_tokens"]) not in keys]
    summary_path.write_text(json.dumps(kept + rows, indent=2) + "\n")
    header = f"{'policy':<12}{'gran':<6}{'budget':>7}{'held':>6}{'ideal':>7}{'eff':>6}{'stock':>7}{'plugin':>8}{'ratio':>7}{'leak':>6}"
    print(header)
    for r in rows:
        print(f"{r['policy']:<12}{r['granularity']:<6}{r['budget']:>7}{r['blocks_held']:>6}{r['blocks_ideal']:>7}"
              f"{r['efficiency']!s:>6}{r['max_running_stock']:>7}{r['max_running_plugin']:>8}{r['capacity_ratio']:>7}{r['leaked_blocks']:>6}")
    print(f"(KV cache {args.num_blocks} blocks of {args.block_size}; {args.num_requests} requests of "
          f"{args.prompt_tokens} prompt tokens; results in {summary_path})")


if __name__ == "__main__":
    main()
