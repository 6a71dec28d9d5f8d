"""Summary table, ``summary.json`` and the accuracy-vs-budget plot, from result JSON lines.

    python benchmarks/quality/report.py RESULTS_DIR_OR_JSONL [...] [--out DIR]

Per (run, engine, policy, allocation, granularity, budget, min_tokens, task, context_tokens): ``n``,
accuracy (mean score), its 95% Wilson interval, and retention = accuracy / full-cache accuracy of
the same run, task and length. ``run`` is the sweep's name (``--engine-name``), ``engine`` what
answered: ``reference``, ``kvpress``, ``server`` (vLLM with the plugin evicting) or ``stock``
(vLLM, ``kv_eviction: none``: a served run's full-cache rows); rows written before rows carried
``run`` get both from their folder (``grid.normalized``). A (task, length) whose full-cache accuracy is below
``--min-full-accuracy`` gets no retention and is flagged; the average rows (``task="all"``)
take retention over the other tasks only (ratio of mean accuracies over those tasks).
Rows with ``context_tokens="all"`` pool every length. Every row names its ``protocol``: ``after``
(the question fed after the compressed context: the runner's ``context``) or ``inside`` (the
whole prompt compressed, question included: ``prompt``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.quality.grid import FULL, normalized, read_rows  # noqa: E402
from vllm_kvevict.evaluation.scoring import wilson_interval  # noqa: E402

SETTING = ("run", "engine", "policy", "allocation", "granularity", "budget", "min_tokens", "vector")
_POLICY = SETTING.index("policy")
_N = len(SETTING)
ALL = "all"
#: Suffix of a VECTOR row's policy in tables and plots (its rows carry ``"vector": true`` and
#: the base scorer as ``policy``).
VECTOR_LABEL = "+vector"
#: The runners' protocol names -> the summary's.
PROTOCOL_NAMES = {"context": "after", "prompt": "inside"}


def _mean(xs) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def label_protocols(rows: list[dict]) -> list[dict]:
    """Rows of one run under two protocols must not pool: call those runs ``run/protocol``."""
    protocols = defaultdict(set)
    for r in rows:
        protocols[r["run"]].add(r.get("protocol"))
    return [dict(r, run=f"{r['run']}/{r['protocol']}") if len(protocols[r["run"]]) > 1 else r for r in rows]


def setting_of(r: dict) -> tuple:
    """A row's setting; ``min_tokens`` 0 for rows written before the floor existed (they had none),
    ``vector`` false for rows without the key."""
    defaults = {"min_tokens": 0, "vector": False}
    return tuple(type(defaults[k])(r.get(k, defaults[k])) if k in defaults else r[k] for k in SETTING)


def policy_label(r: dict) -> str:
    """``policy``, with :data:`VECTOR_LABEL` for VECTOR rows."""
    return r["policy"] + (VECTOR_LABEL if r.get("vector") else "")


def summarize(rows: list[dict], min_full_accuracy: float = 0.1) -> tuple[list[dict], list[dict]]:
    """Return (summary rows, flagged (engine, task, context_tokens, full accuracy) cells)."""
    rows = label_protocols([normalized(r) for r in rows])
    protocol_of = {r["run"]: PROTOCOL_NAMES.get(r.get("protocol"), r.get("protocol")) for r in rows}
    cells: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        setting = setting_of(r)
        for length in (r["context_tokens"], ALL):
            cells[setting + (r["task"], length)].append(float(r["score"]))

    full = {(s[0], s[_N], s[_N + 1]): _mean(v) for s, v in cells.items() if s[_POLICY] == FULL}
    flagged = [
        {"run": e, "task": t, "context_tokens": c, "full_accuracy": acc}
        for (e, t, c), acc in sorted(full.items(), key=str)
        if t != ALL and acc < min_full_accuracy
    ]
    excluded = {(f["run"], f["task"], f["context_tokens"]) for f in flagged}

    out: list[dict] = []

    def row(setting, task, length, scores, retention):
        low, high = wilson_interval(sum(scores), len(scores))
        named = dict(zip(SETTING, setting))
        if not named["vector"]:
            del named["vector"]  # only VECTOR rows carry the key
        out.append(dict(named, protocol=protocol_of[setting[0]], task=task, context_tokens=length,
                        n=len(scores), accuracy=_mean(scores), ci_low=low, ci_high=high, retention=retention))

    by_setting_length: dict[tuple, list[tuple]] = defaultdict(list)
    for key, scores in sorted(cells.items(), key=str):
        setting, task, length = key[:_N], key[_N], key[_N + 1]
        base = full.get((setting[0], task, length))
        ok = (setting[0], task, length) not in excluded and base is not None and base > 0
        row(setting, task, length, scores, _mean(scores) / base if ok else None)
        by_setting_length[(setting, length)].append((task, scores, ok))

    for (setting, length), items in sorted(by_setting_length.items(), key=str):
        scores = [s for _, ss, _ in items for s in ss]
        kept = [(t, ss) for t, ss, ok in items if ok]
        retention = None
        if kept:
            full_kept = [full[(setting[0], t, length)] for t, _ in kept]
            denominator = _mean(full_kept)
            retention = _mean([_mean(ss) for _, ss in kept]) / denominator if denominator > 0 else None
        row(setting, ALL, length, scores, retention)
    return out, flagged


def _fmt(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table(summary: list[dict], flagged: list[dict]) -> str:
    """Markdown: the average over tasks per setting, then accuracy per task."""
    lines = ["| run | engine | policy | allocation | granularity | budget | min_tokens | n | accuracy | 95% CI | retention |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    avg = [r for r in summary if r["task"] == ALL and r["context_tokens"] == ALL]
    order = lambda s: (s[0], s[2] != FULL, s[2], s[7], s[3], s[4], -s[5], s[6])  # noqa: E731
    for r in sorted(avg, key=lambda r: order(setting_of(r))):
        lines.append(f"| {r['run']} | {r['engine']} | {policy_label(r)} | {r['allocation']} | {r['granularity']} | {r['budget']:g} | "
                     f"{r['min_tokens']} | {r['n']} | {_fmt(r['accuracy'])} | [{_fmt(r['ci_low'], 2)}, "
                     f"{_fmt(r['ci_high'], 2)}] | {_fmt(r['retention'])} |")
    tasks = sorted({r["task"] for r in summary if r["task"] != ALL})
    lines += ["", "Accuracy per task (all lengths):", "",
              "| run | engine | policy | allocation | granularity | budget | min_tokens | " + " | ".join(tasks) + " |",
              "|---" * (_N - 1 + len(tasks)) + "|"]
    per = {(setting_of(r), r["task"]): r for r in summary if r["context_tokens"] == ALL}
    for setting in sorted({setting_of(r) for r in avg}, key=order):
        cols = [_fmt(per[(setting, t)]["accuracy"], 2) if (setting, t) in per else "" for t in tasks]
        run, engine, policy, allocation, granularity, budget, floor, vector = setting
        shown = (run, engine, policy + (VECTOR_LABEL if vector else ""), allocation, granularity, f"{budget:g}", floor)
        lines.append("| " + " | ".join(str(x) for x in shown) + " | " + " | ".join(cols) + " |")
    if flagged:
        lines += ["", "Excluded from retention (full-cache accuracy below the threshold):"]
        lines += [f"- {f['run']} {f['task']} @ {f['context_tokens']} tokens: full-cache accuracy {f['full_accuracy']:.2f}" for f in flagged]
    return "\n".join(lines)


def compare(rows: list[dict], engine_a: str, engine_b: str) -> str:
    """Markdown: two runs side by side on the settings and prompts both ran.

    Per (policy, allocation, granularity, budget, min_tokens): each run's accuracy and interval (average over tasks,
    on the prompts both answered), ``differs`` when each accuracy lies outside the other's 95%
    interval, and the paired agreement: prompts where the two scored the same, and where the
    two outputs were the same text.
    """
    from vllm_kvevict.evaluation.scoring import wilson_interval

    rows = label_protocols([normalized(r) for r in rows])
    key = lambda r: (policy_label(r), r["allocation"], r["granularity"], float(r["budget"]), r.get("min_tokens", 0),  # noqa: E731
                     r["uid"])
    a = {key(r): r for r in rows if r["run"] == engine_a}
    b = {key(r): r for r in rows if r["run"] == engine_b}
    cells: dict[tuple, list[tuple]] = defaultdict(list)
    for k in sorted(set(a) & set(b), key=str):
        cells[k[:5]].append((a[k], b[k]))
    lines = [f"| policy | allocation | granularity | budget | min_tokens | n | {engine_a} | {engine_a} 95% CI | {engine_b} | "
             f"{engine_b} 95% CI | differs | same score | same output |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (policy, allocation, granularity, budget, floor), pairs in sorted(
            cells.items(), key=lambda kv: (kv[0][0] != FULL, kv[0][0], kv[0][1], kv[0][2], -kv[0][3], kv[0][4])):
        n = len(pairs)
        sa, sb = [p[0]["score"] for p in pairs], [p[1]["score"] for p in pairs]
        acc_a, acc_b = _mean(sa), _mean(sb)
        ci_a, ci_b = wilson_interval(sum(sa), n), wilson_interval(sum(sb), n)
        differs = not (ci_a[0] <= acc_b <= ci_a[1] or ci_b[0] <= acc_a <= ci_b[1])
        same_score = sum(x == y for x, y in zip(sa, sb))
        same_text = sum(p[0]["output"].strip() == p[1]["output"].strip() for p in pairs)
        lines.append(f"| {policy} | {allocation} | {granularity} | {budget:g} | {floor} | {n} | {acc_a:.3f} | [{ci_a[0]:.2f}, {ci_a[1]:.2f}] | "
                     f"{acc_b:.3f} | [{ci_b[0]:.2f}, {ci_b[1]:.2f}] | {'**yes**' if differs else 'no'} | "
                     f"{same_score}/{n} | {same_text}/{n} |")
    return "\n".join(lines)


def plot(summary: list[dict], path: Path) -> None:
    """Accuracy (average over tasks, all lengths) against budget, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    avg = [r for r in summary if r["task"] == ALL and r["context_tokens"] == ALL]
    engines = sorted({r["run"] for r in avg})
    # one style per (policy, allocation, granularity) across every panel
    line_of = lambda r: (policy_label(r), r["allocation"], r["granularity"], r.get("min_tokens", 0))  # noqa: E731
    styles = {line: i for i, line in enumerate(sorted({line_of(r) for r in avg if r["policy"] != FULL}))}
    fig, axes = plt.subplots(1, len(engines), figsize=(7 * len(engines), 5), squeeze=False)
    for ax, engine in zip(axes[0], engines):
        rows = [r for r in avg if r["run"] == engine]
        full = next((r for r in rows if r["policy"] == FULL), None)
        lines = sorted({line_of(r) for r in rows if r["policy"] != FULL})
        for policy, allocation, granularity, floor in lines:
            i = styles[(policy, allocation, granularity, floor)]
            pts = sorted((r["budget"], r["accuracy"]) for r in rows if line_of(r) == (policy, allocation, granularity, floor))
            if full:
                pts.append((1.0, full["accuracy"]))
            xs, ys = zip(*pts)
            # 20 distinct colours, and marker/line style varying too, so no two lines look alike
            ax.plot(xs, ys, color=plt.cm.tab20(i % 20), marker="osv^D<>p"[i % 8], linestyle=("-", "--", ":")[i % 3],
                    label=f"{policy} ({allocation}, {granularity}" + (f", floor {floor})" if floor else ")"))
        if full:
            ax.axhline(full["accuracy"], color="gray", linestyle="--", linewidth=1, label="full cache")
        ax.set_xscale("log")
        budgets = sorted({r["budget"] for r in rows})
        ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
        ax.set_xticks([], minor=True)
        ax.set_xlabel("KV budget (fraction of the prompt kept)")
        ax.set_ylabel("accuracy (mean over tasks)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{engine}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(inputs: list[Path], out_dir: Path, min_full_accuracy: float = 0.1,
                 comparisons: tuple[tuple[str, str], ...] = (), plot_file: bool = True) -> str:
    rows = list(read_rows(inputs))
    if not rows:
        raise SystemExit(f"no result rows in {', '.join(map(str, inputs))}")
    summary, flagged = summarize(rows, min_full_accuracy)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    text = table(summary, flagged)
    for engine_a, engine_b in comparisons:
        text += f"\n\n{engine_a} against {engine_b}, on the prompts both ran:\n\n" + compare(rows, engine_a, engine_b)
    (out_dir / "summary.md").write_text(text + "\n")
    if plot_file:
        plot(summary, out_dir / "accuracy_vs_budget.png")
    return text


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", type=Path, help="results.jsonl files or folders holding them")
    ap.add_argument("--out", type=Path, help="output folder (default: the first input's folder)")
    ap.add_argument("--min-full-accuracy", type=float, default=0.1)
    ap.add_argument("--compare", action="append", default=[], metavar="A,B",
                    help="also tabulate run A beside run B on the prompts both ran (repeatable)")
    ap.add_argument("--no-plot", action="store_true", help="summary.json and summary.md only")
    args = ap.parse_args(argv)
    out = args.out or (args.inputs[0] if args.inputs[0].is_dir() else args.inputs[0].parent)
    comparisons = tuple(tuple(c.split(",", 1)) for c in args.compare)
    print(write_report(args.inputs, out, args.min_full_accuracy, comparisons, plot_file=not args.no_plot))
    print(f"\nwrote {out / 'summary.json'}, {out / 'summary.md'}, {out / 'accuracy_vs_budget.png'}")


if __name__ == "__main__":
    main()
