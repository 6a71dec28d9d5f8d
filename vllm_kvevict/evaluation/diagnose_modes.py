"""The three failure modes, which one dominates a run, and the summary per policy and budget.

Modes (Zhang et al. 2026): *support recovery* (a span lost whole where the decode-side signal
never found it: ``lost_hidden``), *output-value ranking* (the signal found the missing tokens,
the selector ranked them out anyway: ``lost_visible``, ``partial_visible``; and, off the
evidence, kept slots that move the answer less than evicted ones: positive-margin swaps),
*projection* (coupled evidence broken while fitting scores into the budget: ``partial_hidden``,
part of a number's digits kept by a head or a block, the rest not found by the signal either).

A run's dominant mode is the one whose repair (put that mode's missing evidence back into the
heads it names, at a fixed count) recovers the most answer log-likelihood, when the compressed
cache loses more than ``tol`` nats against the full cache; ``none`` when it does not;
``outside_evidence`` when no repair recovers more than ``tol`` (the loss lies in tokens outside
the known spans).
"""

from __future__ import annotations

from typing import Optional, Sequence

#: Mode names, in the paper's order (ties go to the earlier).
MODES = ("support", "ranking", "projection")
#: The evidence statuses each mode repairs.
STATUSES_OF_MODE = {"support": ("lost_hidden",), "ranking": ("lost_visible", "partial_visible"),
                    "projection": ("partial_hidden",)}
#: Default tolerance (nats) for a gap, a gain or a margin to count.
DEFAULT_TOL = 0.1


def dominant_mode(gap: float, gains: dict[str, Optional[float]], tol: float = DEFAULT_TOL) -> str:
    """``none``, ``outside_evidence`` or the mode of :data:`MODES` with the largest gain
    (``None``: no head had that status, nothing to repair)."""
    if gap <= tol:
        return "none"
    present = [(g, -MODES.index(m), m) for m, g in gains.items() if g is not None]
    if not present or max(present)[0] <= tol:
        return "outside_evidence"
    return max(present)[2]


def positive_share(margins: Sequence[float], tol: float = DEFAULT_TOL) -> Optional[float]:
    """Share of swaps whose margin (log-likelihood after the swap minus before) exceeds ``tol``:
    the kept slot moved the answer less than the evicted one. ``None`` without swaps."""
    if not margins:
        return None
    return sum(m > tol for m in margins) / len(margins)


def _mean(xs: Sequence[float]) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None


def summarize(runs: Sequence[dict], tol: float = DEFAULT_TOL) -> list[dict]:
    """One row per (policy, budget) from the run dicts :func:`~vllm_kvevict.evaluation.diagnose_run.diagnose_task`
    returns: accuracy, mean gap, dominant-mode counts, evidence statuses pooled, positive-margin
    share of the sampled swaps (all, evicted side holding evidence, neither side holding it)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["policy"], r["budget"]), []).append(r)
    rows = []
    for (policy, budget), rs in groups.items():
        swaps = [s for r in rs for s in r["swaps"]]
        statuses: dict[str, int] = {}
        for r in rs:
            for k, v in r["statuses"].items():
                statuses[k] = statuses.get(k, 0) + v
        total = sum(statuses.values()) or 1
        dominant: dict[str, int] = {}
        for r in rs:
            dominant[r["dominant"]] = dominant.get(r["dominant"], 0) + 1
        dominant_failing: dict[str, int] = {}
        for r in rs:
            if r["score"] < 1:
                dominant_failing[r["dominant"]] = dominant_failing.get(r["dominant"], 0) + 1
        failing = [d for d in dominant if d not in ("none", "outside_evidence")]
        rows.append({
            "policy": policy,
            "budget": budget,
            "n": len(rs),
            "accuracy": _mean([r["score"] for r in rs]),
            "mean_gap": _mean([r["gap"] for r in rs]),
            "dominant": dominant,
            "dominant_failing": dominant_failing,
            "dominant_mode": max(failing, key=lambda d: (dominant[d], -MODES.index(d))) if failing else None,
            "status_share": {k: v / total for k, v in statuses.items()},
            "mean_gain": {m: _mean([r["gains"][m] for r in rs if r["gains"][m] is not None]) for m in MODES},
            "swaps": len(swaps),
            "positive_share": positive_share([s["margin"] for s in swaps], tol),
            "max_margin": max((s["margin"] for s in swaps), default=None),
            "positive_share_evidence_in": positive_share([s["margin"] for s in swaps if s["in_evidence"]], tol),
            "positive_share_no_evidence": positive_share(
                [s["margin"] for s in swaps if not s["in_evidence"] and not s["out_evidence"]], tol),
            "seconds": sum(r["seconds"] for r in rs),
        })
    return rows


def _fmt(x: Optional[float], spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def format_table(rows: Sequence[dict]) -> str:
    """A Markdown table of :func:`summarize` rows (dominant mode counted over the failed runs,
    score below 1; the others' counts are in the rows' ``dominant``)."""
    head = ("| policy | budget | n | acc | gap (nats) | dominant (failed runs) | evidence kept / sup. / rank. / proj. "
            "| gain sup. / rank. / proj. | swaps | pos. share (all / ev. in / no ev.) | s |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        g = r["mean_gain"]
        st = {m: sum(r["status_share"].get(s, 0.0) for s in STATUSES_OF_MODE[m]) for m in MODES}
        st["kept"] = r["status_share"].get("kept")
        dom = ", ".join(f"{k} {v}" for k, v in sorted(r["dominant_failing"].items(), key=lambda kv: -kv[1])) or "-"
        lines.append(
            f"| {r['policy']} | {r['budget']:g} | {r['n']} | {_fmt(r['accuracy'])} | {_fmt(r['mean_gap'], '.1f')} "
            f"| {dom} | {' / '.join(_fmt(st.get(s)) for s in ('kept',) + MODES)} "
            f"| {' / '.join(_fmt(g[m], '.1f') for m in MODES)} | {r['swaps']} "
            f"| {_fmt(r['positive_share'])} / {_fmt(r['positive_share_evidence_in'])} / "
            f"{_fmt(r['positive_share_no_evidence'])} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)
