"""Long-context needle questions answered with KV-cache eviction on, in the reference engine.

    python -m vllm_kvevict.reference.demo --policy criticalkv --budget 0.1 --n 5

Generates ``--n`` needle-in-a-haystack prompts of ``--length`` tokens, answers each with the full
cache and with the policy (one prefill per prompt), and prints both answers, the accuracy and
the share of the prompt's KV cache the policy kept.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from vllm_kvevict.config import GRANULARITIES, SCORERS, EvictionConfig, EvictionConfigError
from vllm_kvevict.evaluation.tasks import KINDS, make_suite
from vllm_kvevict.reference.engine import ReferenceEngine
from vllm_kvevict.reference.selection import DEFAULT_BLOCK_SIZE
from vllm_kvevict.reference.study import PROTOCOLS, format_summary, run_task, summarize

DEFAULT_MODEL = Path(os.environ.get("KVEVICT_MODEL_DIR", Path.home() / ".cache/vllm-kvevict/SmolLM2-135M-Instruct"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vllm_kvevict.reference.demo", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="HF model folder (default: $KVEVICT_MODEL_DIR)")
    p.add_argument("--policy", default="criticalkv", choices=[s for s in SCORERS if s != "none"])
    p.add_argument("--budget", type=float, default=0.1, help="fraction of the prompt kept per KV head, or a token count > 1")
    p.add_argument("--n", type=int, default=5, help="number of prompts")
    p.add_argument("--length", type=int, default=2000, help="prompt length in tokens")
    p.add_argument("--kind", default="niah_single", choices=list(KINDS))
    p.add_argument(
        "--protocol",
        default="inside",
        choices=PROTOCOLS,
        help="inside: the question is part of the compressed prompt (as served); after: only the "
        "context is compressed and the question comes after eviction",
    )
    p.add_argument(
        "--granularity",
        default="head",
        choices=GRANULARITIES,
        help="head: per-head variable-length caches; page: whole blocks for all heads (the plugin's first mode)",
    )
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="page size for --granularity page")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    budget = int(args.budget) if args.budget > 1 and args.budget.is_integer() else args.budget
    try:
        policy = EvictionConfig.from_fields(scorer=args.policy, budget=budget, granularity=args.granularity)
    except EvictionConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    engine = ReferenceEngine(args.model)
    tasks = make_suite([args.kind], engine.tokenizer, [args.length], args.n, args.seed)
    print(f"model {args.model.name}; {args.n} x {args.kind} prompts of ~{args.length} tokens; protocol {args.protocol}")
    print(f"policy: {policy.describe()}" + (f" block_size={args.block_size}" if args.granularity == "page" else ""))
    results = []
    start = time.perf_counter()
    for task in tasks:
        runs = run_task(engine, task, [EvictionConfig(), policy], [args.protocol], args.block_size)
        results += runs
        full, evicted = runs
        print(f"\n[{task.uid}] {len(task.prompt_ids)} tokens, answer {', '.join(task.answers)}")
        print(f"  full cache   {'OK ' if full.score == 1 else 'MISS'} {full.output.strip()!r}")
        print(f"  {args.policy:<12} {'OK ' if evicted.score == 1 else 'MISS'} {evicted.output.strip()!r} (kept {evicted.memory_fraction:.1%})")
    print()
    print(format_summary(summarize(results)))
    print(f"\n{time.perf_counter() - start:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
