"""VECTOR variants beside the plain scorer, from one ``report.py`` summary.

    python benchmarks/quality/vector_table.py benchmarks/quality/vector/summary.json \
        --plain reference --variant reference=default --variant reference-relative=relative

Per (protocol, scorer, budget), averaged over tasks and lengths (``task`` and
``context_tokens`` "all"): the plain scorer's accuracy [95% CI] and retention from run
``--plain`` (its rows without VECTOR), then each ``--variant RUN=LABEL``'s VECTOR rows and their
retention minus the plain scorer's. The reference engine is deterministic, so a variant run on
the same prompts (seeds, lengths) as the plain run compares prompt for prompt; ``n`` must match
(checked).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _key(row: dict) -> tuple:
    return row["protocol"], row["policy"], float(row["budget"])


def _base_run(run: str) -> str:
    return run.split("/", 1)[0]


def averages(summary: list[dict], run: str, vector: bool) -> dict:
    """``{(protocol, policy, budget): row}`` of ``run``'s average rows with or without VECTOR."""
    return {_key(r): r for r in summary
            if _base_run(r["run"]) == run and r["task"] == "all" and r["context_tokens"] == "all"
            and bool(r.get("vector", False)) == vector and r["policy"] != "none"}


def _cell(row: dict) -> str:
    return f"{row['accuracy']:.3f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}] | {row['retention']:.3f}"


def build(summary: list[dict], plain: str, variants: list[tuple[str, str]]) -> str:
    base = averages(summary, plain, False)
    found = [(label, averages(summary, run, True)) for run, label in variants]
    head = "| protocol | scorer | budget | n | plain: accuracy [95% CI] | retention | " + " | ".join(
        f"{label}: accuracy [95% CI] | retention | diff" for label, _ in found) + " |"
    lines = [head, "|" + "---|" * (4 + 2 + 3 * len(found))]
    order = {"after": 0, "inside": 1}
    for key in sorted(base, key=lambda k: (order.get(k[0], 2), k[1], -k[2])):
        row = base[key]
        cells = [key[0], key[1], f"{key[2]:g}", str(row["n"]), _cell(row)]
        for label, rows in found:
            other = rows.get(key)
            if other is None:
                cells.append("- | - | -")
                continue
            if other["n"] != row["n"]:
                raise SystemExit(f"{label} {key}: n {other['n']} != plain's {row['n']} (not the same prompts)")
            cells.append(f"{_cell(other)} | {other['retention'] - row['retention']:+.3f}")
        if any(rows.get(key) for _, rows in found):
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("summary", type=Path)
    ap.add_argument("--plain", required=True, help="run whose rows without VECTOR are the baseline")
    ap.add_argument("--variant", action="append", default=[], metavar="RUN=LABEL")
    args = ap.parse_args(argv)
    variants = [tuple(v.split("=", 1)) if "=" in v else (v, v) for v in args.variant]
    print(build(json.loads(args.summary.read_text()), args.plain, variants))


if __name__ == "__main__":
    main()
