"""FLOOR.md's table: accuracy and memory per (protocol, length, policy, budget, floor).

    python benchmarks/quality/floor_table.py benchmarks/quality/results/floor [--out FILE]

Per cell: ``n`` prompts, accuracy (mean score) with its 95% Wilson interval, the mean fraction of
the compressed part's KV entries kept (``memory_fraction``, over every layer and head) and the
mean KV blocks of 128 tokens the compressed part holds in the plugin (``held_blocks``; the full
cache's for policy ``none``); then the same cells side by side, one column per floor
(accuracy, interval, memory fraction); for the question-inside protocol (the whole prompt compressed) also
``B``, the mean tokens per KV head the budget and floor give (``EvictionConfig.budget_tokens``;
page granularity then keeps whole blocks holding at least that). Written to ``OUT/floor_table.md`` and printed.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.quality.grid import FULL, read_rows  # noqa: E402
from benchmarks.quality.report import PROTOCOL_NAMES  # noqa: E402
from vllm_kvevict.evaluation.scoring import wilson_interval  # noqa: E402


def cells(rows: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        key = (PROTOCOL_NAMES.get(r["protocol"], r["protocol"]), r["context_tokens"], r["policy"], r["granularity"],
               float(r["budget"]), int(r.get("min_tokens", 0)))
        out[key].append(r)
    return out


def tokens_per_head(rs: list[dict]) -> str:
    """Mean ``budget_tokens`` of the prompts of a question-inside cell, else ``-``."""
    from vllm_kvevict.config import EvictionConfig

    r = rs[0]
    if r["protocol"] != "prompt":
        return "-"
    if r["policy"] == FULL:
        return f"{sum(x['prompt_tokens'] for x in rs) / len(rs):.0f}"
    config = EvictionConfig(scorer=r["policy"], budget=float(r["budget"]), min_tokens=int(r.get("min_tokens", 0)))
    return f"{sum(config.budget_tokens(x['prompt_tokens']) for x in rs) / len(rs):.0f}"


def table(rows: list[dict]) -> str:
    lines = ["| protocol | tokens | policy | granularity | budget | min_tokens | B | n | accuracy | 95% CI | "
             "memory fraction | held blocks |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = lambda k: (k[0], k[1], k[2] != FULL, k[2], -k[4], k[5])  # noqa: E731
    for key, rs in sorted(cells(rows).items(), key=lambda kv: order(kv[0])):
        protocol, tokens, policy, granularity, budget, floor = key
        scores = [float(r["score"]) for r in rs]
        low, high = wilson_interval(sum(scores), len(scores))
        memory = sum(float(r["memory_fraction"]) for r in rs) / len(rs)
        held = sum(float(r["held_blocks"]) for r in rs) / len(rs)
        lines.append(f"| {protocol} | {tokens} | {policy} | {granularity} | {budget:g} | {floor} | {tokens_per_head(rs)} | {len(rs)} | "
                     f"{sum(scores) / len(scores):.2f} | [{low:.2f}, {high:.2f}] | {memory:.3f} | {held:.2f} |")
    return "\n".join(lines)


def pivot(rows: list[dict]) -> str:
    """One line per (protocol, length, policy, budget), one column per floor:
    ``accuracy [low, high] m=memory fraction``; the full cache on its own line."""
    by = cells(rows)
    floors = sorted({k[5] for k in by if k[2] != FULL})
    lines = ["| protocol | tokens | policy | budget | " + " | ".join(f"min_tokens {f}" for f in floors) + " |",
             "|---" * (4 + len(floors)) + "|"]
    lines_of = sorted({k[:5] for k in by}, key=lambda k: (k[0], k[1], k[2] != FULL, k[2], -k[4]))
    for protocol, tokens, policy, granularity, budget in lines_of:
        cols = []
        for floor in ([0] if policy == FULL else floors):
            rs = by.get((protocol, tokens, policy, granularity, budget, floor))
            if not rs:
                cols.append("")
                continue
            scores = [float(r["score"]) for r in rs]
            low, high = wilson_interval(sum(scores), len(scores))
            memory = sum(float(r["memory_fraction"]) for r in rs) / len(rs)
            cols.append(f"{sum(scores) / len(scores):.2f} [{low:.2f}, {high:.2f}] m={memory:.2f}")
        name = "full cache" if policy == FULL else f"{policy} ({granularity})"
        lines.append(f"| {protocol} | {tokens} | {name} | {budget:g} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", type=Path, help="results folders or jsonl files")
    ap.add_argument("--out", type=Path, help="output file (default: floor_table.md in the first input folder)")
    args = ap.parse_args(argv)
    rows = list(read_rows(args.inputs))
    text = table(rows) + "\n\n" + pivot(rows)
    out = args.out or (args.inputs[0] if args.inputs[0].is_dir() else args.inputs[0].parent) / "floor_table.md"
    out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
