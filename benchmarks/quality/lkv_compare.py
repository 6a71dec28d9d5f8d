"""Two LKV artifacts on the same prompts: the rows of a table run made with each, paired.

    python benchmarks/quality/lkv_compare.py NEW_FOLDER OLD_FOLDER [--full benchmarks/quality/results/table]

``NEW_FOLDER`` and ``OLD_FOLDER``: ``table.sh`` runs of the same settings (``POLICIES=lkv:lkv,...``)
with two artifacts, so their setting keys are equal and only the folder tells them apart. Per
protocol, budget and setting (the rows that read the artifact: ``lkv`` as scorer or allocation),
over the prompts both hold and whose (kind, length) the full cache answers (``--full``'s and both
folders' full-cache rows, as :mod:`table_report` leaves cells out): each artifact's retention,
and new minus old (cluster-bootstrap interval and prompts better / worse, :func:`table_report.paired`).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.quality.grid import FULL, read_rows  # noqa: E402
from benchmarks.quality.table_report import excluded_cells, paired, pooled, scores_by, unique_results  # noqa: E402


def reads_artifact(setting: tuple) -> bool:
    policy, allocation = setting[0], setting[1]
    return "lkv" in (policy, allocation)


def compare(new_rows: list[dict], old_rows: list[dict], full_rows: list[dict], min_full: float) -> list[dict]:
    """One entry per (protocol, budget, setting that reads the artifact) both runs hold."""
    every = unique_results(full_rows + new_rows + old_rows)
    left_out = excluded_cells(every, min_full)
    full = scores_by(pooled(every, left_out))
    new, old = scores_by(pooled(new_rows, left_out)), scores_by(pooled(old_rows, left_out))
    out = []
    for protocol in sorted(new):
        full_scores = next((s for k, s in full[protocol].items() if k[0] == FULL), {})
        for key in sorted(new[protocol], key=lambda k: (-k[2], k[0], k[1])):
            if not reads_artifact(key) or key not in old.get(protocol, {}):
                continue
            a, b = new[protocol][key], old[protocol][key]
            uids = sorted(set(a) & set(b) & set(full_scores))
            base = sum(full_scores[u] for u in uids)
            retention = (lambda s: sum(s[u] for u in uids) / base if base else 0.0)
            out.append({"protocol": protocol, "budget": key[2], "policy": key[0], "allocation": key[1],
                        "n": len(uids), "new": retention(a), "old": retention(b),
                        **paired({u: a[u] for u in uids}, {u: b[u] for u in uids})})
    return out


def render(entries: list[dict]) -> str:
    lines = ["| protocol | budget | setting | prompts | retention, new | retention, old | new - old [95% CI] (better / worse) |",
             "|---|---|---|---|---|---|---|"]
    for e in entries:
        lines.append(f"| {e['protocol']} | {e['budget']:g} | {e['policy']} + {e['allocation']} | {e['n']} | "
                     f"{e['new']:.2f} | {e['old']:.2f} | {e['diff']:+.3f} [{e['diff_low']:+.2f}, {e['diff_high']:+.2f}] "
                     f"({e['better']} / {e['worse']}) |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("new", type=Path)
    ap.add_argument("old", type=Path)
    ap.add_argument("--full", type=Path, nargs="*", default=[], help="more folders whose full-cache rows count")
    ap.add_argument("--min-full-accuracy", type=float, default=0.1)
    args = ap.parse_args(argv)
    full_rows = [r for r in read_rows(args.full) if r["policy"] == FULL] if args.full else []
    print(render(compare(list(read_rows([args.new])), list(read_rows([args.old])), full_rows, args.min_full_accuracy)))


if __name__ == "__main__":
    main()
