"""The value-aware diagnostic: why a selector loses an answer, one decision slot at a time.

    python -m vllm_kvevict.evaluation.diagnose --scorer criticalkv --budget 0.1 0.2 --kinds niah_single ...

With the selector's setup fixed (the *contract*), each sampled swap takes one kept slot out and
one evicted slot in and measures the change of the answer's log-likelihood under the reference
engine; evidence spans are checked per (layer, KV head) and each failure mode's missing
evidence is put back at a fixed count (:mod:`.diagnose_run`). Tasks x configs, a JSON file, a
table; docs/DIAGNOSTIC.md has the design and the results.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Optional

from vllm_kvevict.evaluation.diagnose_modes import DEFAULT_TOL, format_table, summarize

#: As :data:`vllm_kvevict.reference.study.PROTOCOLS` (not imported: ``--help`` stays light).
PROTOCOLS = ("inside", "after")


def build_configs(specs, budgets, granularity: str, head_selection: Optional[str], min_tokens: Optional[int]):
    """One :class:`EvictionConfig` per (scorer spec, budget); spec overrides win over the flags."""
    from vllm_kvevict.config import EvictionConfig
    from vllm_kvevict.reference.study import parse_policy

    configs = []
    for spec in specs:
        scorer, extra = parse_policy(spec)
        for b in budgets:
            fields = {"scorer": scorer, "budget": int(b) if b > 1 else b, "granularity": granularity}
            if head_selection is not None and granularity == "head":
                fields["head_selection"] = head_selection
            if min_tokens is not None:
                fields["min_tokens"] = min_tokens
            configs.append(EvictionConfig(**{**fields, **extra}))
    return configs



def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vllm_kvevict.evaluation.diagnose",
        description="Fixed-contract diagnostic of KV eviction (support / ranking / projection), reference engine.",
    )
    p.add_argument("--scorer", nargs="+", required=True,
                   help="scorers, each optionally with config overrides: criticalkv:epsilon=0.0001,head_selection=token")
    p.add_argument("--budget", nargs="+", type=float, required=True, help="fractions in (0, 1) or token counts > 1")
    p.add_argument("--model", type=Path, default=Path(os.environ.get("KVEVICT_MODEL_DIR", "")))
    p.add_argument("--kinds", nargs="+", default=["niah_single"])
    p.add_argument("--lengths", nargs="+", type=int, default=[1024])
    p.add_argument("--n", type=int, default=2, help="prompts per kind x length")
    p.add_argument("--seed", type=int, default=0, help="task seed (as reference.study)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="inside",
                   help="inside: the question is compressed with the context; after: fed after eviction")
    p.add_argument("--granularity", choices=("head", "page"), default="head")
    p.add_argument("--head-selection", choices=("token", "page"), default=None,
                   help="head granularity: single tokens or whole pages per head (default: the config's)")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--min-tokens", type=int, default=None, help="the config's floor (default: its default)")
    p.add_argument("--m", type=int, default=3, help="swaps per unit: m lowest kept x m highest evicted slots")
    p.add_argument("--units", type=int, default=6, help="decision units sampled per run ((layer, head) pairs)")
    p.add_argument("--sample-seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=DEFAULT_TOL, help="nats: smallest gap, gain or margin that counts")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="JSON: arguments, runs, summary")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.m < 1 or args.units < 1:
        parser().error(f"--m and --units must be >= 1 (got {args.m}, {args.units})")
    if any(not (0 < b < 1 or b > 1) for b in args.budget):
        parser().error(f"--budget: each must be in (0, 1) or a token count > 1, got {args.budget}")
    import torch

    from vllm_kvevict.config import EvictionConfigError
    from vllm_kvevict.evaluation.diagnose_run import answer_target, diagnose_task
    from vllm_kvevict.evaluation.tasks import make_suite
    from vllm_kvevict.reference.engine import ReferenceEngine

    torch.set_num_threads(args.threads)
    try:
        configs = build_configs(args.scorer, args.budget, args.granularity, args.head_selection, args.min_tokens)
    except (EvictionConfigError, ValueError) as exc:
        parser().error(str(exc))
    engine = ReferenceEngine(args.model)
    tasks = make_suite(args.kinds, engine.tokenizer, args.lengths, args.n, args.seed)
    start = time.perf_counter()
    runs = []
    for i, task in enumerate(tasks):
        prefilled = engine.prefill(task.prompt_ids)
        target = answer_target(engine, task, prefilled, args.protocol)
        for config in configs:
            run = diagnose_task(engine, task, config, prefilled=prefilled, target=target, protocol=args.protocol,
                                block_size=args.block_size, m=args.m, units=args.units,
                                seed=args.sample_seed * 1_000_003 + i, tol=args.tol)
            runs.append(run)
            print(f"[{i + 1}/{len(tasks)}] {task.uid} {run['policy']} b={run['budget']:g} score={run['score']:.2f} "
                  f"gap={run['gap']:.1f} dominant={run['dominant']} statuses={run['statuses']} "
                  f"pos={run['positive_share']} out={run['output']!r} ({time.perf_counter() - start:.0f} s)", flush=True)
    rows = summarize(runs, args.tol)
    table = format_table(rows)
    print(table)
    wall = time.perf_counter() - start
    print(f"wall time {wall:.0f} s for {len(tasks)} prompts x {len(configs)} configs, "
          f"{sum(r['forwards'] for r in runs)} reference forwards")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.out.write_text(json.dumps({"args": meta, "wall_seconds": wall, "summary": rows, "table": table,
                                        "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
