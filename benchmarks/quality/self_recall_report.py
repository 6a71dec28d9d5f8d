"""The self-recall table, plot and summary rows, from ``self_recall.py``'s result rows.

Only prompts whose stock (full-cache) run has a question count (a list with no early item of a
unique name and line has none), and whose stock list is at least one decode interval long (a
shorter one ended before any decode-time eviction, in every setting, as every run is stock's
until its first eviction); the others are counted and left out of every setting. Per setting: n,
accuracy, its 95% Wilson interval and a bootstrap interval over prompts, retention = accuracy /
stock's, the paired difference to stock on the same prompts with its bootstrap interval, how
often the run asked the same question as stock (the same early item: the list's start
is written before the first eviction, so it is usually the same), and the mean tokens held when
the question came. Rows go to ``OUT/summary.json`` and, replacing the earlier ``self-recall`` rows,
to ``benchmarks/quality/summary.json`` (the rows of ``report.py``, ``protocol: self-recall``).
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Optional

from vllm_kvevict.evaluation.scoring import wilson_interval

HERE = Path(__file__).resolve().parent
SUMMARY = HERE / "summary.json"
RUN = "self-recall"
BOOTSTRAP = 2000


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def bootstrap(values: list[float], seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean over ``BOOTSTRAP`` resamples (seeded)."""
    if not values:
        return 0.0, 1.0
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=len(values))) / len(values) for _ in range(BOOTSTRAP))
    return means[int(0.025 * BOOTSTRAP)], means[int(0.975 * BOOTSTRAP) - 1]


def setting_of(r: dict) -> tuple:
    return (r["policy"], float(r["budget"]), int(r["min_tokens"]), int(r["decode_interval"]))


def label(setting: tuple) -> str:
    policy, budget, _, _ = setting
    if policy == "none":
        return "stock (full cache)"
    return f"{policy} cap {int(budget)}" if budget > 1 else f"{policy} {budget:g} of the length"


def summarize(rows: list[dict]) -> tuple[list[dict], dict]:
    stock = {r["uid"]: r for r in rows if r["policy"] == "none"}
    interval = min((r["decode_interval"] for r in rows if r["decode_interval"] > 0), default=0)
    with_question = {uid for uid, r in stock.items() if r["question"] is not None}
    # a list that ended before the first interval met no decode-time eviction in any setting
    asked = {uid for uid in with_question if stock[uid]["generated_tokens"] >= interval}
    cells: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        if r["uid"] in asked:
            cells[setting_of(r)][r["uid"]] = r
    stock_acc = sum(stock[u]["score"] for u in asked) / len(asked) if asked else float("nan")
    out = []
    order = sorted(cells, key=lambda s: (s[0] != "none", s[0], s[1] <= 1, s[1]))
    for setting in order:
        by_uid = cells[setting]
        uids = sorted(by_uid)
        scores = [by_uid[u]["score"] for u in uids]
        n = len(scores)
        acc = sum(scores) / n
        low, high = wilson_interval(sum(scores), n)
        b_low, b_high = bootstrap(scores)
        diffs = [by_uid[u]["score"] - stock[u]["score"] for u in uids]
        d_low, d_high = bootstrap(diffs, seed=1)
        same_q = sum(by_uid[u]["question"] == stock[u]["question"] for u in uids)
        held = [by_uid[u]["held_at_question"] for u in uids if by_uid[u].get("held_at_question") is not None]
        first = by_uid[uids[0]]
        out.append(dict(run=RUN, engine="reference", policy=setting[0], allocation=first["allocation"],
                        granularity=first["granularity"], budget=setting[1], min_tokens=setting[2],
                        protocol="self-recall", task="self_recall", context_tokens="all", n=n, accuracy=acc,
                        ci_low=low, ci_high=high,
                        retention=acc / stock_acc if stock_acc and stock_acc > 0 else None,
                        decode_interval=setting[3], bootstrap_low=b_low, bootstrap_high=b_high,
                        diff_vs_stock=sum(diffs) / n, diff_low=d_low, diff_high=d_high, same_question=same_q,
                        no_question=sum(by_uid[u]["question"] is None for u in uids),
                        mean_generated=sum(by_uid[u]["generated_tokens"] for u in uids) / n,
                        mean_held_at_question=sum(held) / len(held) if held else None,
                        mean_items=sum(by_uid[u]["items"] for u in uids) / n,
                        mean_wall_s=sum(by_uid[u]["wall_s"] for u in uids) / n))
    info = dict(prompts=len(stock), with_question=len(with_question), evicted_before_question=len(asked))
    return out, info


def table(summary: list[dict], info: dict, prior: list[dict]) -> str:
    lines = [f"Prompts: {info['prompts']} run at full cache, {info['with_question']} with a question "
             f"(an early item of a unique name and line), {info['evicted_before_question']} of them with a list "
             "of at least one decode interval (shorter ones ended before any decode-time eviction, in "
             "every setting: left out); every row below is on those.", "",
             "| setting | n | accuracy | 95% Wilson | 95% bootstrap | retention | vs stock (paired) | "
             "same question | held at question | generated | items | s/run |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        ret = "-" if r["retention"] is None else f"{r['retention']:.2f}"
        held = "-" if r["mean_held_at_question"] is None else f"{r['mean_held_at_question']:.0f}"
        lines.append(f"| {label(setting_of(r))} | {r['n']} | {r['accuracy']:.3f} | [{r['ci_low']:.2f}, {r['ci_high']:.2f}] | "
                     f"[{r['bootstrap_low']:.2f}, {r['bootstrap_high']:.2f}] | {ret} | {r['diff_vs_stock']:+.2f} "
                     f"[{r['diff_low']:+.2f}, {r['diff_high']:+.2f}] | {r['same_question']}/{r['n']} | {held} | "
                     f"{r['mean_generated']:.0f} | {r['mean_items']:.1f} | {r['mean_wall_s']:.0f} |")
    if prior:
        s = sum(p["score"] for p in prior)
        low, high = wilson_interval(s, len(prior))
        lines += ["", f"Guess rate (stock's question with no list before it): {s / len(prior):.3f} "
                      f"[{low:.2f}, {high:.2f}], n = {len(prior)}."]
    return "\n".join(lines)


def plot(summary: list[dict], prior: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r["budget"] for r in summary if r["policy"] != "none"}, key=lambda b: (b <= 1, b))
    xs = {b: i for i, b in enumerate(budgets)}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, policy in enumerate(sorted({r["policy"] for r in summary} - {"none"})):
        rows = sorted((r for r in summary if r["policy"] == policy), key=lambda r: xs[r["budget"]])
        x = [xs[r["budget"]] + (k - 1) * 0.06 for r in rows]
        y = [r["accuracy"] for r in rows]
        err = [[a - r["ci_low"] for a, r in zip(y, rows)], [r["ci_high"] - a for a, r in zip(y, rows)]]
        ax.errorbar(x, y, yerr=err, marker="os^D"[k % 4], capsize=3, label=policy)
    stock = next((r for r in summary if r["policy"] == "none"), None)
    if stock:
        ax.axhspan(stock["ci_low"], stock["ci_high"], color="gray", alpha=0.15)
        ax.axhline(stock["accuracy"], color="gray", linestyle="--", label=f"stock, full cache (n={stock['n']})")
    if prior:
        ax.axhline(sum(p["score"] for p in prior) / len(prior), color="black", linestyle=":", label="guess (no list)")
    ax.set_xticks(range(len(budgets)), [f"cap {int(b)}" if b > 1 else f"{b:g} x length" for b in budgets])
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("accuracy (95% Wilson)")
    ax.set_title("Self-recall under decode-time eviction (SmolLM2-135M, page, interval 64)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SCHEMA = ("run", "engine", "policy", "allocation", "granularity", "budget", "min_tokens", "protocol", "task",
          "context_tokens", "n", "accuracy", "ci_low", "ci_high", "retention")


def update_summary(summary: list[dict], path: Path = SUMMARY) -> None:
    """Replace the ``self-recall`` rows of the quality summary with these (its row schema)."""
    rows = [r for r in json.loads(path.read_text()) if r.get("run") != RUN] if path.exists() else []
    rows += [{k: r[k] for k in SCHEMA} for r in summary]
    path.write_text(json.dumps(rows, indent=1))


def write_report(out: Path, summary_path: Optional[Path] = None) -> str:
    """Table, ``OUT/summary.json``, ``OUT/summary.md``, the plot; ``summary_path``: also the rows there."""
    rows = [r for p in sorted(out.glob("results.shard*.jsonl")) for r in _read(p)]
    if not rows:
        raise SystemExit(f"no result rows in {out}")
    summary, info = summarize(rows)
    prior = _read(out / "prior.jsonl")
    text = table(summary, info, prior)
    (out / "summary.json").write_text(json.dumps(dict(info, rows=summary), indent=1))
    (out / "summary.md").write_text(text + "\n")
    plot(summary, prior, out / "self_recall.png")
    if summary_path is not None:
        update_summary(summary, summary_path)
    return text
