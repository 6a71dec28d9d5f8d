"""Join the benchmark's arms into ``summary.json``, ``RESULTS.md`` and ``throughput.png``.

    python benchmarks/serving/report.py --out DIR [--title "..."]

Per plugin row, against the stock row of the same (prompt, output) of the same run:
``throughput_ratio`` (output tokens/s over stock's), the capacity ratio ``c`` (most requests
running at once over stock's), stock's prefill share ``p`` (its prefill-only run's time over
its full run's), the Amdahl ``bound = 1 / (p + (1 - p) / c)`` (prefill is not shortened by
eviction, decode at most by ``c``), ``of_bound`` (ratio over bound), and what scoring +
compaction add to prefill (the plugin's prefill-only time over stock's, minus one). The targets
of issue 16 are checked on those numbers; the check's verdicts (``check.json``) and the kernel
comparison (``kernels.json``), when present, are summarised too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

TARGETS = {"of_bound": 0.8, "best_ratio_at_0.1": 5.5, "scoring_share": 0.03}


def _load(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.exists() else None


def join(stock: dict, plugin: dict) -> list[dict]:
    """One summary row per run (stock rows included, ratio 1)."""
    base = {(r["prompt_tokens"], r["output_tokens"]): r for r in stock["rows"]}
    out = []
    for arm, data in (("stock", stock), ("plugin", plugin)):
        for r in data["rows"]:
            s = base.get((r["prompt_tokens"], r["output_tokens"]))
            if s is None:
                continue
            flat = r.get("flat") or {}
            p = s["prefill_elapsed_s"] / s["elapsed_s"] if s["elapsed_s"] else None
            c = r["max_running"] / s["max_running"] if s["max_running"] else None
            bound = 1 / (p + (1 - p) / c) if p is not None and c else None
            ratio = r["output_tok_s"] / s["output_tok_s"] if s["output_tok_s"] else None
            out.append({
                "device": data["meta"]["device"], "mode": data["meta"]["engine"], "arm": arm, "policy": r["policy"],
                "scorer": flat.get("kv_eviction", "none"),
                "granularity": flat.get("kv_granularity", "head") if flat else None,
                "budget": flat.get("kv_budget"), "prompt_tokens": r["prompt_tokens"],
                "output_tokens": r["output_tokens"], "requests": r["requests"], "output_tok_s": r["output_tok_s"],
                "total_tok_s": r["total_tok_s"], "max_running": r["max_running"], "preemptions": r["preemptions"],
                "kept_share": r.get("kept_share"),
                "kv_tokens_per_request": round((r["kept_share"] if r.get("kept_share") else 1.0) * r["prompt_tokens"]
                                               + r["output_tokens"]),
                "ttft_median_s": r["ttft_median_s"], "tpot_median_s": r["tpot_median_s"],
                "prefill_share_stock": round(p, 4) if p is not None else None,
                "capacity_ratio": round(c, 3) if c else None,
                "throughput_ratio": round(ratio, 3) if ratio else None, "bound": round(bound, 3) if bound else None,
                "of_bound": round(ratio / bound, 3) if ratio and bound else None,
                "scoring_share_of_prefill": round(r["prefill_elapsed_s"] / s["prefill_elapsed_s"] - 1, 4)
                if arm == "plugin" and s["prefill_elapsed_s"] else None,
            })
    return out


def decode_no_slower(kernels: Optional[list]) -> Optional[bool]:
    """Whether the two-segment decode reads its bytes at least as fast as vLLM's FA3 decode at
    every shape both ran (fraction of the memory floor: bytes per second, i.e. per cached token)."""
    if not kernels:
        return None
    ours = [k["fraction_of_floor"] for k in kernels if k["kernel"] == "decode_two_segment"]
    theirs = [k["fraction_of_floor"] for k in kernels if k["kernel"] == "decode_vllm_fa3"]
    if not ours or len(ours) != len(theirs):
        return None
    return all(a >= b for a, b in zip(ours, theirs))


def targets(rows: list[dict]) -> dict:
    plugin = [r for r in rows if r["arm"] == "plugin"]
    at_01 = [r["throughput_ratio"] for r in plugin if r["budget"] == 0.1 and r["throughput_ratio"]]
    return {
        "every_row_of_bound": all((r["of_bound"] or 0) >= TARGETS["of_bound"] for r in plugin) if plugin else None,
        "best_ratio_at_0.1": max(at_01) if at_01 else None,
        "best_ratio_at_0.1_met": (max(at_01) >= TARGETS["best_ratio_at_0.1"]) if at_01 else None,
        "scoring_share_met": all((r["scoring_share_of_prefill"] or 0) <= TARGETS["scoring_share"] for r in plugin)
        if plugin else None,
    }


def markdown(title: str, rows: list[dict], goal: dict, notes: list[str], check: Optional[dict],
             kernels: Optional[list]) -> str:
    lines = [f"# {title}", ""] + [f"- {n}" for n in notes] + [""]
    head = ("| prompt x output | arm | policy | out tok/s | total tok/s | ratio | max running | c | p | bound | "
            "of bound | preempt | kept | KV tok/req | TTFT med s | TPOT med s | scoring+compaction / prefill |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [f"{r['prompt_tokens']} x {r['output_tokens']}", r["arm"], r["policy"], r["output_tok_s"],
                 r["total_tok_s"], r["throughput_ratio"], r["max_running"], r["capacity_ratio"],
                 r["prefill_share_stock"], r["bound"], r["of_bound"], r["preemptions"], r["kept_share"],
                 r["kv_tokens_per_request"], r["ttft_median_s"], r["tpot_median_s"], r["scoring_share_of_prefill"]]
        lines.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    lines += ["", "Targets (issue 16): every row >= 0.8 of its bound: "
              f"{goal['every_row_of_bound']}; best ratio at budget 0.1 >= 5.5: {goal['best_ratio_at_0.1']} "
              f"({goal['best_ratio_at_0.1_met']}); scoring + compaction <= 3% of prefill: {goal['scoring_share_met']}; "
              f"two-segment decode no slower per cached token than FA3: {goal['decode_no_slower_than_vllm_fa3']}.",
              ""]
    if kernels:
        decode = [k for k in kernels if k["kernel"].startswith("decode_")]
        lines += ["Decode kernels on this machine (benchmarks/kernels/bench.py --only decode; fraction of the "
                  "memory floor of the bytes each reads, so per cached token higher is faster):", ""]
        lines += [f"- {k['kernel']} ({k['shape']}): {k['median_ms']} ms, {k['fraction_of_floor']} of floor"
                  for k in decode]
        lines.append("")
    if check:
        lines += [f"Correctness check (check.json): {'PASSED' if check['passed'] else 'FAILED'}, "
                  f"{sum(r['passed'] for r in check['results'])}/{len(check['results'])} checks.", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plugin = [r for r in rows if r["arm"] == "plugin" and r["throughput_ratio"]]
    if not plugin:
        return
    labels = [f"{r['prompt_tokens']}x{r['output_tokens']}\n{r['policy']}" for r in plugin]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(plugin)), 4))
    x = range(len(plugin))
    ax.bar(x, [r["throughput_ratio"] for r in plugin], label="plugin / stock output tok/s")
    ax.scatter(x, [r["bound"] or 0 for r in plugin], color="black", marker="_", s=600, label="Amdahl bound")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("throughput ratio")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--title", default="Serving benchmark: stock vLLM against vllm-kvevict at a fixed KV cache")
    ap.add_argument("--note", action="append", default=[], help="a line for RESULTS.md (repeatable)")
    args = ap.parse_args(argv)
    stock, plugin = _load(args.out / "rows_stock.json"), _load(args.out / "rows_plugin.json")
    check, kernels = _load(args.out / "check.json"), _load(args.out / "kernels.json")
    if stock is None or plugin is None:
        stock = plugin = {"meta": {"device": check["device"] if check else "?", "vllm": "?", "engine": "-",
                                   "plan": {"kv_tokens": "-", "kv_cache_bytes": "-"}, "skipped": []}, "rows": []}
        print("report: no benchmark rows (an arm did not run or did not finish)")
    rows = join(stock, plugin)
    goal = targets(rows)
    goal["decode_no_slower_than_vllm_fa3"] = decode_no_slower(kernels)
    meta = stock["meta"]
    skipped = meta.get("skipped", []) + plugin["meta"].get("skipped", [])
    notes = [f"Device: {meta['device']}; vLLM {meta['vllm']}; stock: {meta['engine']}; plugin: "
             f"{plugin['meta']['engine']}.",
             f"Fixed KV cache: {meta['plan']['kv_tokens']} tokens ({meta['plan']['kv_cache_bytes']} bytes) for both.",
             "p: stock's prefill-only time over its full run; c: max running over stock's; bound = 1/(p + (1-p)/c).",
             "The long-output row (2048 x 4096) is not run: it gains only from decode-time eviction, which is not "
             "implemented yet (--kv-decode-interval is refused)."]
    notes += args.note
    if skipped:
        notes.append("Skipped (past the arm's time budget): " + ", ".join(skipped) + ".")
    summary = {"meta": {"stock": meta, "plugin": plugin["meta"]}, "targets": goal, "rows": rows,
               "check_passed": check["passed"] if check else None}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    (args.out / "RESULTS.md").write_text(markdown(args.title, rows, goal, notes, check, kernels))
    plot(rows, args.out / "throughput.png", args.title)
    print((args.out / "RESULTS.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
