"""LKV against Ada-KV and KeyDiff at equal held blocks: the tables of ``benchmarks/quality/LKV.md``.

    python benchmarks/quality/lkv_report.py benchmarks/quality/results/lkv-after \
        benchmarks/quality/results/lkv-inside [--held-out niah_multivalue,qa] [--out FILE]

Per protocol (``after``: question fed after the compressed context; ``inside``: the whole prompt
compressed), head selection (``head``: the plugin's default at the block size, whole pages per
head at 32; ``head-token``: single tokens per head), budget and setting (scorer + allocation),
over three prompt groups (every kind;
the kinds LKV trained on; the kinds held out of its training): accuracy with its 95% Wilson
interval, retention = sum of scores / sum of full-cache scores on the same prompts with its
95% bootstrap interval (prompts resampled, 2,000 draws, seed 0), and the mean blocks held. A
(kind, length) whose full-cache accuracy is under 0.1 is left out of retention (and counted in
the table's note), as in ``report.py``. Then, prompt by prompt, each setting against
``keydiff`` + ``adakv`` (better / worse / tie).
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.quality.grid import FULL, read_rows  # noqa: E402
from benchmarks.quality.report import PROTOCOL_NAMES  # noqa: E402
from vllm_kvevict.evaluation.scoring import wilson_interval  # noqa: E402

MIN_FULL_ACCURACY = 0.1
BOOTSTRAP_DRAWS = 2000
BASELINE = ("keydiff", "adakv")
#: Settings in table order: LKV, its two ablations, the other scorers with either allocation.
ORDER = [("lkv", "lkv"), ("lkv", "adakv"), ("keydiff", "lkv"), ("keydiff", "adakv"), ("snapkv", "lkv"),
         ("snapkv", "adakv"), ("criticalkv", "lkv"), ("criticalkv", "adakv")]


def retention_interval(pairs: list[tuple[float, float]], seed: int = 0) -> tuple[float, float, float]:
    """``(retention, low, high)`` of ``sum(policy) / sum(full)`` over ``(policy, full)`` pairs."""
    total = sum(f for _, f in pairs)
    if not pairs or total <= 0:
        return float("nan"), float("nan"), float("nan")
    rng = random.Random(seed)
    draws = []
    for _ in range(BOOTSTRAP_DRAWS):
        sample = [pairs[rng.randrange(len(pairs))] for _ in pairs]
        full = sum(f for _, f in sample)
        if full > 0:
            draws.append(sum(p for p, _ in sample) / full)
    draws.sort()
    return sum(p for p, _ in pairs) / total, draws[int(0.025 * len(draws))], draws[int(0.975 * len(draws)) - 1]


def tables(rows: list[dict], held_out: set[str]) -> str:
    full = {(r["protocol"], r["uid"]): r for r in rows if r["policy"] == FULL}
    by_cell = defaultdict(list)
    for r in full.values():
        by_cell[(r["protocol"], r["task"], r["context_tokens"])].append(r["score"])
    excluded = {k for k, v in by_cell.items() if sum(v) / len(v) < MIN_FULL_ACCURACY}
    settings = defaultdict(dict)
    for r in rows:
        if r["policy"] != FULL:
            settings[(r["protocol"], r["granularity"], float(r["budget"]), r["policy"], r["allocation"])][r["uid"]] = r
    groups = {"all kinds": lambda kind: True, "trained kinds": lambda kind: kind not in held_out,
              "held-out kinds": lambda kind: kind in held_out}
    lines = []
    for protocol, granularity in sorted({k[:2] for k in settings}):
        name = PROTOCOL_NAMES.get(protocol, protocol)
        fulls = [r for (p, _), r in full.items() if p == protocol]
        n_excl = sum(1 for r in fulls if (protocol, r["task"], r["context_tokens"]) in excluded)
        lines += ["", f"### Protocol `{name}`, selection `{granularity}` ({len(fulls)} prompts; {n_excl} in cells the "
                  "full cache fails, left out of retention)", "",
                  "| budget | scorer | allocation | prompts | accuracy [95% CI] | retention [95% CI] | held-out: "
                  "accuracy | held-out: retention [95% CI] | trained kinds: retention | held blocks |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        full_acc = sum(r["score"] for r in fulls) / len(fulls)
        lo, hi = wilson_interval(sum(r["score"] for r in fulls), len(fulls))
        lines.append(f"| 1 | full cache | - | {len(fulls)} | {full_acc:.3f} [{lo:.2f}, {hi:.2f}] | 1 | | | | "
                     f"{_mean([r.get('held_blocks', float('nan')) for r in fulls]):.1f} |")
        mine = {k[2:]: v for k, v in settings.items() if k[:2] == (protocol, granularity)}
        budgets = sorted({k[0] for k in mine}, reverse=True)
        for budget in budgets:
            for scorer, allocation in [s for s in ORDER if (budget,) + s in mine]:
                cells = mine[(budget, scorer, allocation)]
                stats = {}
                for group, keep in groups.items():
                    chosen = [r for r in cells.values() if keep(r["task"])]
                    pairs = [(r["score"], full[(protocol, r["uid"])]["score"]) for r in chosen
                             if (protocol, r["task"], r["context_tokens"]) not in excluded]
                    acc = _mean([r["score"] for r in chosen])
                    ci = wilson_interval(sum(r["score"] for r in chosen), len(chosen))
                    stats[group] = (len(chosen), acc, ci, retention_interval(pairs))
                n, acc, ci, (ret, rlo, rhi) = stats["all kinds"]
                _, hacc, _, (hret, hlo, hhi) = stats["held-out kinds"]
                tret = stats["trained kinds"][3][0]
                held = _mean([r.get("held_blocks", float("nan")) for r in cells.values()])
                bold = "**" if (scorer, allocation) == ("lkv", "lkv") else ""
                lines.append(f"| {budget:g} | {bold}{scorer}{bold} | {allocation} | {n} | {acc:.3f} [{ci[0]:.2f}, "
                             f"{ci[1]:.2f}] | {bold}{ret:.2f}{bold} [{rlo:.2f}, {rhi:.2f}] | {hacc:.3f} | {hret:.2f} "
                             f"[{hlo:.2f}, {hhi:.2f}] | {tret:.2f} | {held:.1f} |")
        lines += ["", f"Prompt by prompt against {BASELINE[0]} + {BASELINE[1]} (better / worse / tie):", "",
                  "| budget | scorer | allocation | better | worse | tie |", "|---|---|---|---|---|---|"]
        for budget in budgets:
            base = mine.get((budget,) + BASELINE, {})
            for scorer, allocation in [s for s in ORDER if s != BASELINE and (budget,) + s in mine]:
                cells = mine[(budget, scorer, allocation)]
                diffs = [cells[u]["score"] - base[u]["score"] for u in cells if u in base]
                lines.append(f"| {budget:g} | {scorer} | {allocation} | {sum(d > 0 for d in diffs)} | "
                             f"{sum(d < 0 for d in diffs)} | {sum(d == 0 for d in diffs)} |")
    return "\n".join(lines)


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", type=Path, help="result folders (run.py --out)")
    ap.add_argument("--held-out", default="niah_multivalue,qa", help="kinds held out of LKV's training")
    ap.add_argument("--out", type=Path, default=None, help="write the tables here too")
    args = ap.parse_args(argv)
    text = tables(list(read_rows(args.inputs)), set(args.held_out.split(",")))
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
