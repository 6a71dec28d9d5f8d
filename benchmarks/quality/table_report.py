"""The quality table of ``table.sh``: both protocols side by side, pooled over kinds and lengths.

    python benchmarks/quality/table_report.py benchmarks/quality/results/table [--baseline criticalkv:adakv]

Per protocol (``after``: question fed after eviction; ``inside``: the whole prompt compressed),
per (policy, allocation, budget), over the prompts whose (kind, length) the full cache answers
(full-cache accuracy >= ``--min-full-accuracy`` in that protocol; the others are listed and left
out): ``n``, accuracy with its 95% Wilson interval, retention (accuracy / full-cache accuracy on
the same prompts), the paired difference against the full cache (95% bootstrap interval resampling
drafts: one draft's prompts at each length share needles and depths, :func:`paired`) and accuracy per length, then per kind. Then, paired on the same prompts:
each setting against ``--baseline``, adakv against uniform for every scorer that ran both, and
question inside against question after. Then what resolves: the paired intervals' half-widths,
the prompts a half-width of 0.1 would take (``n * (half-width / 0.1)^2``), and the CPU time per
prompt. Written to ``OUT/table.md`` and ``OUT/table.json`` (OUT: the first input folder) and
printed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.quality.grid import FULL, normalized, read_rows  # noqa: E402
from benchmarks.quality.report import PROTOCOL_NAMES  # noqa: E402
from benchmarks.quality.validate_table import BOOTSTRAP_RESAMPLES, baseline_arg, sign_test_p  # noqa: E402
from vllm_kvevict.evaluation.scoring import wilson_interval  # noqa: E402

#: The issue's bars for the best policy (retention at budget 0.2, at 0.1), per protocol.
TARGETS = {"inside": {0.2: 0.95, 0.1: 0.9}, "after": {0.2: 0.9, 0.1: 0.8}}
#: The half-width of a paired 95% interval that lets a difference of 0.1 resolve.
RESOLVE = 0.1


def draft_of(uid: str) -> str:
    """The draft a prompt was made from: ``kind-seed`` (its uid without length and question
    position). A draft fixes needles, values and their relative depths, so the prompts of one
    draft at 1k, 2k and 4k are not independent samples."""
    kind_length_position, _, seed = uid.rpartition("-")
    kind = kind_length_position.rsplit("-", 2)[0]
    return f"{kind}-{seed}"


def paired(a: dict[str, float], b: dict[str, float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """``a`` minus ``b`` (uid -> score) over the prompts both hold: the mean difference over
    prompts, its 95% percentile-bootstrap interval resampling drafts (:func:`draft_of`; each
    drawn draft brings all its prompts: a cluster bootstrap), prompts better / worse / tied, and
    a two-sided exact sign test over the drafts whose mean difference is not zero."""
    uids = sorted(set(a) & set(b))
    clusters: dict[str, list[float]] = defaultdict(list)
    for u in uids:
        clusters[draft_of(u)].append(a[u] - b[u])
    diffs = [a[u] - b[u] for u in uids]
    sums = [(sum(v), len(v)) for _, v in sorted(clusters.items())]
    low = high = 0.0
    if sums:
        rng = random.Random(seed)
        means = []
        for _ in range(resamples):
            drawn = [sums[rng.randrange(len(sums))] for _ in sums]
            means.append(sum(x for x, _ in drawn) / sum(n for _, n in drawn))
        means.sort()
        low, high = means[int(0.025 * resamples)], means[min(resamples - 1, math.ceil(0.975 * resamples) - 1)]
    better = sum(x > 0 for x, _ in sums)
    worse = sum(x < 0 for x, _ in sums)
    return {"n_pairs": len(uids), "drafts": len(sums), "diff": sum(diffs) / len(diffs) if diffs else 0.0,
            "diff_low": low, "diff_high": high, "better": sum(d > 0 for d in diffs), "worse": sum(d < 0 for d in diffs),
            "tie": sum(d == 0 for d in diffs), "sign_p": sign_test_p(better, worse)}


def vector_of(r: dict) -> str:
    """``""`` for plain eviction, else VECTOR's gates as the row records them (runs with
    different gates are different settings)."""
    if not r.get("vector"):
        return ""
    gates = [r.get("vector_residual"), None if r.get("vector_min_r2") is None else f"R^2 >= {r['vector_min_r2']:g}"]
    return ", ".join(g for g in gates if g) or "on"


def setting(r: dict) -> tuple:
    """(policy, allocation, budget, :func:`vector_of`): a row's setting."""
    return r["policy"], r["allocation"], float(r["budget"]), vector_of(r)


def label(policy: str, allocation: str, vector: str = "") -> str:
    if policy == FULL:
        return "full cache"
    return f"{policy} ({allocation})" + (f" + VECTOR ({vector})" if vector else "")


def _setting_label(e: dict) -> str:
    return label(e["policy"], e["allocation"], e["vector"])


def scores_by(rows: list[dict]) -> dict[str, dict[tuple, dict[str, float]]]:
    """protocol -> setting -> uid -> score."""
    out: dict[str, dict[tuple, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        out[PROTOCOL_NAMES.get(r["protocol"], r["protocol"])][setting(r)][r["uid"]] = float(r["score"])
    return out


def excluded_cells(rows: list[dict], min_full: float) -> dict[tuple, dict]:
    """(protocol, kind, length) -> full-cache accuracy and n, for cells below ``min_full``."""
    cells: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        if r["policy"] == FULL:
            cells[(PROTOCOL_NAMES.get(r["protocol"], r["protocol"]), r["task"], r["context_tokens"])].append(float(r["score"]))
    return {c: {"full_accuracy": sum(v) / len(v), "n": len(v)} for c, v in sorted(cells.items())
            if sum(v) / len(v) < min_full}


def pooled(rows: list[dict], excluded: dict[tuple, dict]) -> list[dict]:
    """``rows`` outside the ``excluded`` (protocol, kind, length) cells (:func:`excluded_cells`)."""
    return [r for r in rows
            if (PROTOCOL_NAMES.get(r["protocol"], r["protocol"]), r["task"], r["context_tokens"]) not in excluded]


def unique_results(rows: list[dict]) -> list[dict]:
    """``rows`` with each (prompt, protocol, setting) once, the first given: folders read together
    (a table and the rows run beside it) each hold the full-cache rows of their prompts."""
    seen: set[tuple] = set()
    out = []
    for r in rows:
        key = (r["uid"], r["protocol"], setting(r))
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _mean(d: dict[str, float]) -> float:
    return sum(d.values()) / len(d) if d else 0.0


def summarize(rows: list[dict], baseline: tuple[str, str], min_full: float) -> dict:
    rows = [normalized(r) for r in rows]
    results = unique_results(rows)
    excluded = excluded_cells(results, min_full)
    cell_of = {r["uid"]: (r["task"], r["context_tokens"]) for r in results}
    kept = pooled(results, excluded)
    scores = scores_by(kept)
    lengths = sorted({r["context_tokens"] for r in kept})
    kinds = sorted({r["task"] for r in kept})
    out: dict = {"excluded": [{"protocol": p, "task": t, "context_tokens": c, **v} for (p, t, c), v in excluded.items()],
                 "baseline": f"{baseline[0]}:{baseline[1]}", "protocols": {}}
    for protocol in ("after", "inside"):
        table = scores.get(protocol)
        if not table:
            continue
        full = next((v for s, v in table.items() if s[0] == FULL), {})
        entries = []
        for s in sorted(table, key=lambda s: (s[0] != FULL, s[0], s[1], s[3], -s[2])):
            v = table[s]
            shared = [u for u in v if u in full]
            full_acc = sum(full[u] for u in shared) / len(shared) if shared else 0.0
            low, high = wilson_interval(sum(v.values()), len(v))
            entry = {"policy": s[0], "allocation": s[1], "budget": s[2], "vector": s[3], "n": len(v), "accuracy": _mean(v),
                     "ci_low": low, "ci_high": high,
                     "retention": sum(v[u] for u in shared) / len(shared) / full_acc if full_acc > 0 else None,
                     "per_length": {str(n): _mean({u: x for u, x in v.items() if cell_of[u][1] == n}) for n in lengths
                                    if any(cell_of[u][1] == n for u in v)},
                     "length_n": {str(n): sum(cell_of[u][1] == n for u in v) for n in lengths},
                     "per_kind": {k: _mean({u: x for u, x in v.items() if cell_of[u][0] == k}) for k in kinds
                                  if any(cell_of[u][0] == k for u in v)},
                     "kind_n": {k: sum(cell_of[u][0] == k for u in v) for k in kinds}}
            if s[0] != FULL:
                entry["vs_full"] = paired(v, full)
                base = table.get((baseline[0], baseline[1], s[2], ""))
                if base is not None and (s[:2] != baseline or s[3]):
                    entry["vs_baseline"] = paired(v, base)
                if s[1] == "adakv" and (s[0], "uniform", s[2], s[3]) in table:
                    entry["adakv_vs_uniform"] = paired(v, table[(s[0], "uniform", s[2], s[3])])
                if s[3] and (*s[:3], "") in table:
                    entry["vector_vs_plain"] = paired(v, table[(*s[:3], "")])
            other = scores.get("after" if protocol == "inside" else "inside", {}).get(s)
            if protocol == "inside" and other:
                entry["inside_vs_after"] = paired(v, other)
            entries.append(entry)
        out["protocols"][protocol] = entries
    out["resolution"] = resolution(out["protocols"])
    out["cost"] = cost(rows)
    return out


def resolution(protocols: dict) -> dict:
    """Half-widths of the paired intervals against the full cache, and the prompts a half-width
    of :data:`RESOLVE` would take (the interval shrinks as 1/sqrt(n))."""
    widths = [((e["vs_full"]["diff_high"] - e["vs_full"]["diff_low"]) / 2, e["vs_full"]["n_pairs"])
              for entries in protocols.values() for e in entries if "vs_full" in e and e["vs_full"]["n_pairs"]]
    if not widths:
        return {}
    hw = [w for w, _ in widths]
    worst = max(widths)
    drafts = min(e["vs_full"]["drafts"] for entries in protocols.values() for e in entries if "vs_full" in e)
    return {"pairs": min(n for _, n in widths), "drafts": drafts, "median_half_width": statistics.median(hw), "max_half_width": worst[0],
            "prompts_for_half_width": {str(RESOLVE): max(1, round(worst[1] * (worst[0] / RESOLVE) ** 2)),
                                       str(RESOLVE / 2): max(1, round(worst[1] * (worst[0] / (RESOLVE / 2)) ** 2))}}


def cost(rows: list[dict]) -> dict:
    """CPU seconds per prompt by length: one prefill plus every row of both protocols."""
    per_prompt: dict[str, float] = defaultdict(float)
    length_of, prefill = {}, {}
    for r in rows:
        per_prompt[r["uid"]] += float(r.get("cpu_seconds", 0.0))
        prefill[r["uid"]] = float(r.get("prefill_cpu_seconds", 0.0))
        length_of[r["uid"]] = r["context_tokens"]
    by_length: dict[int, list[float]] = defaultdict(list)
    for uid, s in per_prompt.items():
        by_length[length_of[uid]].append(s + prefill[uid])
    return {str(n): {"prompts": len(v), "cpu_seconds_per_prompt": sum(v) / len(v)} for n, v in sorted(by_length.items())}


def _pair(p: dict) -> str:
    return (f"{p['diff']:+.3f} [{p['diff_low']:+.2f}, {p['diff_high']:+.2f}] "
            f"({p['better']}/{p['worse']}/{p['tie']}, p={p['sign_p']:.3f})")


def _f(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def glance(summary: dict) -> list[str]:
    """Retention of every setting at every budget, both protocols side by side."""
    protocols = list(summary["protocols"])
    budgets = sorted({e["budget"] for es in summary["protocols"].values() for e in es if e["policy"] != FULL}, reverse=True)
    cells = {(p, e["policy"], e["allocation"], e["vector"], e["budget"]): e
             for p, es in summary["protocols"].items() for e in es}
    settings = sorted({(e["policy"], e["allocation"], e["vector"]) for es in summary["protocols"].values()
                       for e in es if e["policy"] != FULL})
    lines = ["## Retention at a glance (accuracy / full-cache accuracy on the same prompts)", "",
             "| setting | " + " | ".join(f"{p} {b:g}" for p in protocols for b in budgets) + " |",
             "|---|" + "---|" * (len(protocols) * len(budgets))]
    for s in settings:
        lines.append(f"| {label(*s)} | " + " | ".join(_f(cells[(p, *s, b)]["retention"]) if (p, *s, b) in cells else "-"
                                                    for p in protocols for b in budgets) + " |")
    full = {p: next((e for e in es if e["policy"] == FULL), None) for p, es in summary["protocols"].items()}
    lines += ["", "Full cache: " + ", ".join(f"{p} {e['accuracy']:.3f} (n={e['n']})" for p, e in full.items() if e), ""]
    return lines


def render(summary: dict) -> str:
    lines: list[str] = glance(summary)
    lengths = sorted({n for entries in summary["protocols"].values() for e in entries for n in e["length_n"]}, key=int)
    for protocol, entries in summary["protocols"].items():
        lines += [f"## Question {protocol}", "",
                  "| setting | budget | n | accuracy | 95% CI | retention | vs full cache (paired, 95% CI over drafts) | "
                  + " | ".join(f"{n} tok (n)" for n in lengths) + " |",
                  "|---|---|---|---|---|---|---|" + "---|" * len(lengths)]
        for e in entries:
            vs = _pair(e["vs_full"]) if "vs_full" in e else ""
            per = " | ".join(f"{e['per_length'][n]:.2f} ({e['length_n'][n]})" if n in e["per_length"] else "-" for n in lengths)
            lines.append(f"| {_setting_label(e)} | {e['budget']:g} | {e['n']} | {e['accuracy']:.3f} | "
                         f"[{e['ci_low']:.2f}, {e['ci_high']:.2f}] | {_f(e['retention'])} | {vs} | {per} |")
        target = TARGETS.get(protocol, {})
        for budget, bar in target.items():
            at = [e for e in entries if e["budget"] == budget and e["retention"] is not None]
            if at:
                best = max(at, key=lambda e: e["retention"])
                lines.append(f"\nBest at {budget:g}: {_setting_label(best)}, retention "
                             f"{best['retention']:.2f} (bar {bar:g}: {'met' if best['retention'] >= bar else 'not met'}).")
        kinds = sorted({k for e in entries for k in e["per_kind"]})
        full = next((e for e in entries if e["policy"] == FULL), entries[0])
        lines += ["", "Accuracy per kind, pooled over lengths (descriptive):", "",
                  "| setting | budget | " + " | ".join(f"{k} (n={full['kind_n'].get(k, 0)})" for k in kinds) + " |",
                  "|---|---|" + "---|" * len(kinds)]
        lines += [f"| {_setting_label(e)} | {e['budget']:g} | "
                  + " | ".join(_f(e["per_kind"].get(k)) for k in kinds) + " |" for e in entries]
        sections = [("vs_baseline", f"Paired against {summary['baseline']} at the same budget"),
                    ("adakv_vs_uniform", "adakv minus uniform, same scorer and budget"),
                    ("inside_vs_after", "question inside minus question after, same setting"),
                    ("vector_vs_plain", "VECTOR minus plain eviction, same scorer, allocation and budget (equal held blocks)")]
        for key, title in sections:
            rows = [e for e in entries if key in e]
            if rows:
                lines += ["", f"{title} (difference [95% CI over drafts] (prompts better/worse/tie, sign-test p over drafts)):", "",
                          "| setting | budget | pairs | difference |", "|---|---|---|---|"]
                lines += [f"| {_setting_label(e)} | {e['budget']:g} | {e[key]['n_pairs']} | {_pair(e[key])} |"
                          for e in rows]
        lines.append("")
    res = summary["resolution"]
    if res:
        lines += ["## What resolves", "",
                  f"Paired intervals against the full cache over >= {res['pairs']} prompts ({res['drafts']} drafts): "
                  f"half-width median "
                  f"{res['median_half_width']:.3f}, widest {res['max_half_width']:.3f}; a half-width of {RESOLVE:g} "
                  f"(a difference of {RESOLVE:g} resolves) would take about {res['prompts_for_half_width'][str(RESOLVE)]} "
                  f"prompts for the widest, {RESOLVE / 2:g} about {res['prompts_for_half_width'][str(RESOLVE / 2)]}.", ""]
    lines += ["CPU seconds per prompt (one prefill and every row of both protocols): "
              + ", ".join(f"{n} tok {c['cpu_seconds_per_prompt']:.0f} s (n={c['prompts']})" for n, c in summary["cost"].items()), ""]
    if summary["excluded"]:
        lines += ["Left out (full cache below the threshold): "
                  + ", ".join(f"{e['protocol']} {e['task']} {e['context_tokens']} ({e['full_accuracy']:.2f}, n={e['n']})"
                              for e in summary["excluded"]), ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", type=Path, help="results folders or jsonl files")
    ap.add_argument("--baseline", type=baseline_arg, default=("criticalkv", "adakv"),
                    help="policy:allocation every other setting is paired against (default: the main job's criticalkv:adakv)")
    ap.add_argument("--min-full-accuracy", type=float, default=0.1)
    ap.add_argument("--out", type=Path, help="output folder (default: the first input folder)")
    args = ap.parse_args(argv)
    rows = list(read_rows(args.inputs))
    if not rows:
        raise SystemExit(f"no result rows in {', '.join(map(str, args.inputs))}")
    summary = summarize(rows, args.baseline, args.min_full_accuracy)
    text = render(summary)
    out = args.out or (args.inputs[0] if args.inputs[0].is_dir() else args.inputs[0].parent)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text + "\n")
    (out / "table.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
