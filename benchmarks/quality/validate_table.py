"""VALIDATION.md's table: each scorer against a comparator on the same prompts, per budget.

    python benchmarks/quality/validate_table.py benchmarks/quality/results/validate-inside \
        [--baseline snapkv:adakv [--baseline snapkv:uniform]] [--out DIR]

Per (policy, allocation, budget), pooled over the kinds and lengths of the folder: ``n`` prompts,
accuracy (mean score) with its 95% Wilson interval, retention (accuracy / full-cache accuracy on
the same prompts); then, per ``--baseline`` (``policy:allocation``), the paired difference of
every other setting against it at the same budget on the prompts both ran: mean difference with a 95% percentile-bootstrap interval over prompts (10,000
resamples, fixed generator, so the table is reproducible), how many prompts each side scored
higher, and a two-sided exact sign-test p-value over the untied prompts. Then accuracy per kind.
Written to ``OUT/validate_table.md`` and ``OUT/validate_table.json`` (default OUT: the first
input folder) and printed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.quality.grid import FULL, read_rows  # noqa: E402
from vllm_kvevict.evaluation.scoring import wilson_interval  # noqa: E402

BOOTSTRAP_RESAMPLES = 10_000


def bootstrap_interval(diffs: list[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of ``diffs`` (resampling prompts)."""
    if not diffs:
        return 0.0, 0.0
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return means[int(0.025 * resamples)], means[min(resamples - 1, int(math.ceil(0.975 * resamples)) - 1)]


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test over the untied pairs (1.0 when there are none)."""
    m = wins + losses
    if m == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2**m
    return min(1.0, 2 * tail)


def paired(a: dict[str, float], b: dict[str, float]) -> dict:
    """``a`` minus ``b`` over the prompts (uid -> score) both hold."""
    uids = sorted(set(a) & set(b))
    diffs = [a[u] - b[u] for u in uids]
    wins = sum(d > 0 for d in diffs)
    losses = sum(d < 0 for d in diffs)
    low, high = bootstrap_interval(diffs)
    return {"n_pairs": len(uids), "diff": sum(diffs) / len(diffs) if diffs else 0.0, "diff_low": low,
            "diff_high": high, "better": wins, "worse": losses, "tie": len(uids) - wins - losses,
            "sign_p": sign_test_p(wins, losses)}


def summarize(rows: list[dict], baselines: list[tuple[str, str]]) -> list[dict]:
    """One entry per (policy, allocation, granularity, budget), the full cache first; ``vs`` holds
    the paired difference against each baseline ``(policy, allocation)`` with rows at that budget."""
    scores: dict[tuple, dict[str, float]] = defaultdict(dict)
    kinds: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        key = (r["policy"], r["allocation"], r["granularity"], float(r["budget"]))
        scores[key][r["uid"]] = float(r["score"])
        kinds[key][r["task"]].append(float(r["score"]))
    full = next((v for k, v in scores.items() if k[0] == FULL), {})
    base = {(k[0], k[1], k[3]): v for k, v in scores.items()}
    out = []
    for key in sorted(scores, key=lambda k: (k[0] != FULL, -k[3], k[0])):
        s = scores[key]
        n = len(s)
        acc = sum(s.values()) / n
        low, high = wilson_interval(sum(s.values()), n)
        shared = [u for u in s if u in full]
        full_acc = sum(full[u] for u in shared) / len(shared) if shared else 0.0
        entry = {"policy": key[0], "allocation": key[1], "granularity": key[2], "budget": key[3], "n": n,
                 "accuracy": acc, "ci_low": low, "ci_high": high,
                 "retention": (sum(s[u] for u in shared) / len(shared)) / full_acc if full_acc > 0 else None,
                 "per_kind": {t: sum(v) / len(v) for t, v in sorted(kinds[key].items())},
                 "kind_n": {t: len(v) for t, v in sorted(kinds[key].items())}}
        entry["vs"] = {f"{p}:{a}": paired(s, base[(p, a, key[3])]) for p, a in baselines
                       if key[0] != FULL and (p, a) != key[:2] and (p, a, key[3]) in base}
        out.append(entry)
    return out


def _f(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table(summary: list[dict], baselines: list[tuple[str, str]]) -> str:
    lines = ["| policy | allocation | budget | n | accuracy | 95% CI | retention |", "|---|---|---|---|---|---|---|"]
    for e in summary:
        name = "full cache" if e["policy"] == FULL else e["policy"]
        lines.append(f"| {name} | {e['allocation']} | {e['budget']:g} | {e['n']} | {e['accuracy']:.3f} | "
                     f"[{e['ci_low']:.2f}, {e['ci_high']:.2f}] | {_f(e['retention'])} |")
    for p, a in baselines:
        label = f"{p}:{a}"
        lines += ["", f"Paired against {p} ({a}) at the same budget, on the same prompts:", "",
                  "| policy | allocation | budget | pairs | difference | 95% CI (bootstrap) | better / worse / tie | sign p |",
                  "|---|---|---|---|---|---|---|---|"]
        for e in summary:
            v = e["vs"].get(label) if "vs" in e else None
            if v:
                lines.append(f"| {e['policy']} | {e['allocation']} | {e['budget']:g} | {v['n_pairs']} | {v['diff']:+.3f} | "
                             f"[{v['diff_low']:+.2f}, {v['diff_high']:+.2f}] | {v['better']} / {v['worse']} / {v['tie']} | "
                             f"{v['sign_p']:.3f} |")
    kinds = sorted({t for e in summary for t in e["per_kind"]})
    lines += ["", "Accuracy per kind (descriptive; the header's n is the full cache's, a cell with fewer prompts "
              "says so in the table above):", "",
              "| policy | allocation | budget | " + " | ".join(f"{t} (n={summary[0]['kind_n'].get(t, 0)})" for t in kinds) + " |",
              "|---|---|---|" + "---|" * len(kinds)]
    for e in summary:
        name = "full cache" if e["policy"] == FULL else e["policy"]
        lines.append(f"| {name} | {e['allocation']} | {e['budget']:g} | " + " | ".join(_f(e["per_kind"].get(t)) for t in kinds) + " |")
    return "\n".join(lines)


def baseline_arg(text: str) -> tuple[str, str]:
    """``--baseline POLICY:ALLOCATION`` (argparse type)."""
    policy, _, allocation = text.partition(":")
    if not policy or not allocation:
        raise argparse.ArgumentTypeError(f"{text!r}: expected policy:allocation, e.g. snapkv:adakv")
    return policy, allocation


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", type=Path, help="results folders or jsonl files")
    ap.add_argument("--baseline", type=baseline_arg, action="append",
                    help="policy:allocation every other setting is paired against (repeatable; default snapkv:adakv)")
    ap.add_argument("--out", type=Path, help="output folder (default: the first input folder)")
    args = ap.parse_args(argv)
    rows = list(read_rows(args.inputs))
    if not rows:
        raise SystemExit(f"no result rows in {', '.join(map(str, args.inputs))}")
    baselines = args.baseline or [("snapkv", "adakv")]
    settings = {(r["policy"], r["allocation"]) for r in rows}
    for b in baselines:
        if b not in settings:
            raise SystemExit(f"--baseline: {b[0]}:{b[1]} has no rows; settings: {sorted(f'{p}:{a}' for p, a in settings)}")
    summary = summarize(rows, baselines)
    text = table(summary, baselines)
    out = args.out or (args.inputs[0] if args.inputs[0].is_dir() else args.inputs[0].parent)
    out.mkdir(parents=True, exist_ok=True)
    (out / "validate_table.md").write_text(text + "\n")
    (out / "validate_table.json").write_text(json.dumps({"baselines": [f"{p}:{a}" for p, a in baselines], "rows": summary}, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
