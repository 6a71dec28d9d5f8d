"""Accuracy against budget on generated tasks, with the reference engine.

Each task is prefilled once; every (protocol, policy) run copies what it keeps from that one
prefill and decodes its own answer (the cheap sweep).

Protocols
---------
``inside``: the whole prompt (context and question) is compressed, then decoding starts (what a
served request with eviction after prefill does). ``after``: only the context is compressed;
the question is fed after eviction at its true positions and is never evicted (kvpress's
protocol, the harder one).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.evaluation.scoring import score, wilson_interval
from vllm_kvevict.reference.engine import ReferenceEngine
from vllm_kvevict.reference.selection import DEFAULT_BLOCK_SIZE

PROTOCOLS = ("inside", "after")


@dataclass
class RunResult:
    """One task decoded under one policy and protocol."""

    uid: str
    protocol: str
    policy: str
    budget: float
    score: float
    memory_fraction: float
    prompt_tokens: int
    compressed_tokens: int
    output: str
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)


#: Fields a policy name always shows; any other field set explicitly is appended as ``key=value``.
_NAMED_FIELDS = ("scorer", "budget", "allocation", "granularity")


def policy_name(config: EvictionConfig) -> str:
    """``scorer/allocation/granularity``, then ``/key=value`` for each other field set explicitly."""
    if config.keeps_everything:
        return "full"
    name = f"{config.scorer}/{config.resolved_allocation}/{config.resolved_granularity}"
    extra = sorted(set(config.model_fields_set) - set(_NAMED_FIELDS))
    return name + "".join(f"/{key}={getattr(config, key)}" for key in extra)


def parse_policy(spec: str) -> tuple[str, dict]:
    """``"criticalkv:allocation=uniform,rho=0.8"`` -> ``("criticalkv", {"allocation": "uniform", "rho": "0.8"})``.

    The overrides are EvictionConfig fields (validated there); a bare ``"snapkv"`` has none.
    """
    scorer, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"policy override {item!r} in {spec!r} is not key=value")
        overrides[key.strip()] = value.strip()
    return scorer.strip(), overrides


def run_task(
    engine: ReferenceEngine,
    task,
    configs: Sequence[EvictionConfig],
    protocols: Iterable[str] = PROTOCOLS,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> list[RunResult]:
    """Every config under every protocol on one :class:`~vllm_kvevict.evaluation.tasks.Task`."""
    prefilled = engine.prefill(task.prompt_ids)
    results = []
    for protocol in protocols:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        inside = protocol == "inside"
        base = prefilled if inside else prefilled.prefix(task.context_end)
        suffix = None if inside else task.question_ids
        for config in configs:
            start = time.perf_counter()
            gen = engine.generate(base, config, task.max_new_tokens, suffix_ids=suffix, block_size=block_size)
            results.append(
                RunResult(
                    uid=task.uid,
                    protocol=protocol,
                    policy=policy_name(config),
                    budget=float(config.budget) if config.enabled else 1.0,
                    score=score(task, gen.text),
                    memory_fraction=gen.memory_fraction,
                    prompt_tokens=len(task.prompt_ids),
                    compressed_tokens=base.prompt_len,
                    output=gen.text,
                    seconds=time.perf_counter() - start,
                )
            )
    return results


def summarize(results: Sequence[RunResult]) -> list[dict]:
    """Mean score, its 95% Wilson interval and mean memory kept per (protocol, policy, budget)."""
    groups: dict[tuple, list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.protocol, r.policy, r.budget), []).append(r)
    rows = []
    for (protocol, policy, budget), rs in groups.items():
        total = sum(r.score for r in rs)
        low, high = wilson_interval(total, len(rs))
        rows.append(
            {
                "protocol": protocol,
                "policy": policy,
                "budget": budget,
                "n": len(rs),
                "accuracy": total / len(rs),
                "ci95": (low, high),
                "memory_kept": sum(r.memory_fraction for r in rs) / len(rs),
            }
        )
    return rows


def format_summary(rows: Sequence[dict]) -> str:
    lines = [f"{'protocol':8} {'policy':40} {'budget':>6} {'n':>3} {'accuracy':>8} {'95% CI':>13} {'memory':>7}"]
    for row in rows:
        low, high = row["ci95"]
        lines.append(
            f"{row['protocol']:8} {row['policy']:40} {row['budget']:6.2f} {row['n']:3d} "
            f"{row['accuracy']:8.2f} {f'[{low:.2f}, {high:.2f}]':>13} {row['memory_kept']:7.3f}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m vllm_kvevict.reference.study``: the sweep, a JSON line per run, a summary."""
    import argparse
    import json
    import os
    from pathlib import Path

    import torch

    from vllm_kvevict.evaluation.tasks import make_suite

    p = argparse.ArgumentParser(prog="python -m vllm_kvevict.reference.study", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=Path(os.environ.get("KVEVICT_MODEL_DIR", "")))
    p.add_argument("--kinds", nargs="+", default=["niah_single"])
    p.add_argument("--lengths", nargs="+", type=int, default=[2000, 3000])
    p.add_argument("--n", type=int, default=10, help="prompts per kind x length")
    p.add_argument(
        "--policies",
        nargs="+",
        default=["snapkv", "criticalkv"],
        help="scorers, each optionally with config overrides: criticalkv:allocation=uniform,rho=0.8",
    )
    p.add_argument("--budgets", nargs="+", type=float, default=[0.25])
    p.add_argument("--granularity", default="head")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    p.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=PROTOCOLS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="JSON lines, one per run")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = [parse_policy(spec) for spec in args.policies]
    configs = [EvictionConfig()] + [
        EvictionConfig(**{"scorer": s, "budget": int(b) if b > 1 else b, "granularity": args.granularity, **extra})
        for s, extra in specs
        for b in args.budgets
    ]
    engine = ReferenceEngine(args.model)
    tasks = make_suite(args.kinds, engine.tokenizer, args.lengths, args.n, args.seed)
    start = time.perf_counter()
    results: list[RunResult] = []
    out = args.out.open("w") if args.out else None
    for i, task in enumerate(tasks):
        runs = run_task(engine, task, configs, args.protocols, args.block_size)
        results += runs
        if out:
            for r in runs:
                out.write(json.dumps(r.to_json()) + "\n")
            out.flush()
        marks = " ".join(f"{r.protocol[0]}:{r.policy}={r.score:.0f}" for r in runs)
        print(f"[{i + 1}/{len(tasks)}] {task.uid} {marks} ({time.perf_counter() - start:.0f} s)", flush=True)
    if out:
        out.close()
    print(format_summary(summarize(results)))
    print(f"wall time {time.perf_counter() - start:.0f} s for {len(tasks)} prompts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
