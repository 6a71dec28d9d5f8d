"""One diagnostic run: a task under one config (the command is :mod:`.diagnose`).

With the selector's setup fixed (scorer, budget, allocation, granularity, window, block size:
the *contract*), each sampled swap takes one kept slot out and one evicted slot in
(:mod:`.diagnose_slots`) and measures the change of the gold answer's log-likelihood under the
reference engine (:mod:`.diagnose_margin`); the generated task's known evidence spans
(:mod:`.diagnose_evidence`) are checked per (layer, KV head), and each failure mode's missing
evidence is put back at a fixed count to see which mode costs the answer
(:mod:`.diagnose_modes`). docs/DIAGNOSTIC.md has the design and the results.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.evaluation.diagnose_decision import decide
from vllm_kvevict.evaluation.diagnose_evidence import count_statuses, coverage, evidence_mask, evidence_spans
from vllm_kvevict.evaluation.diagnose_margin import answer_fit, answer_ids, shortest_correct
from vllm_kvevict.evaluation.diagnose_modes import DEFAULT_TOL, MODES, STATUSES_OF_MODE, dominant_mode, positive_share
from vllm_kvevict.evaluation.diagnose_slots import apply_swap, repair_head, sample_swaps
from vllm_kvevict.evaluation.scoring import score
from vllm_kvevict.reference.selection import keep_all
from vllm_kvevict.reference.study import PROTOCOLS, policy_name


def repaired(decision, spans, statuses, wanted: tuple, prompt_len: int) -> Optional[list]:
    """``decision.kept`` with every span whose status is in ``wanted`` put back in the heads that
    have it (at a fixed count per head); ``None`` when no head has such a span."""
    locked_evidence = evidence_mask(spans, prompt_len)
    kept = [list(row) for row in decision.kept]
    touched = False
    for l, row in enumerate(statuses):
        for h, per_span in enumerate(row):
            missing = [spans[i].tokens for i, s in enumerate(per_span) if s in wanted]
            if not missing:
                continue
            touched = True
            locked = decision.protected[l][h] | locked_evidence
            kept[l][h] = repair_head(kept[l][h], torch.cat(missing), decision.token_rank[l][h], locked)
    return kept if touched else None


def _compressed(prefilled, task, protocol: str):
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    base = prefilled if protocol == "inside" else prefilled.prefix(task.context_end)
    suffix = torch.empty(0, dtype=torch.long) if protocol == "inside" else torch.tensor(task.question_ids)
    return base, suffix


def answer_target(engine, task, prefilled, protocol: str = "inside") -> tuple[list[int], str]:
    """The answer whose log-likelihood is measured, and where it came from: the full cache's
    greedy output cut at its shortest correct prefix (``"full_cache"``: the model's own wording
    of a list), or the gold answers joined (``"gold"``) when the full cache gets it wrong."""
    base, suffix = _compressed(prefilled, task, protocol)
    gen = engine.generate(base, EvictionConfig(), task.max_new_tokens, suffix_ids=suffix if suffix.numel() else None)
    own = shortest_correct(task, engine.tokenizer, gen.token_ids)
    return (own, "full_cache") if own is not None else (answer_ids(engine.tokenizer, task.answers), "gold")


def diagnose_task(engine, task, config: EvictionConfig, *, prefilled=None, target=None, protocol: str = "inside",
                  block_size: int = 32, m: int = 3, units: int = 6, seed: int = 0, tol: float = DEFAULT_TOL) -> dict:
    """One task under one config: fits, evidence statuses, repair gains, sampled swap margins.

    ``target``: ``(answer token ids, source)`` from :func:`answer_target` (computed when absent)."""
    start = time.perf_counter()
    prefilled = prefilled if prefilled is not None else engine.prefill(task.prompt_ids)
    base, suffix = _compressed(prefilled, task, protocol)
    target_ids, target_source = target if target is not None else answer_target(engine, task, prefilled, protocol)
    target = torch.tensor(target_ids)
    L = base.prompt_len
    spans = evidence_spans(task, engine.tokenizer)
    decision = decide(base, config, block_size)
    forwards = 0

    def fit(kept):
        nonlocal forwards
        forwards += 1
        return answer_fit(engine.parts, base, kept, suffix, target)

    full, before = fit(keep_all(base)), fit(decision.kept)
    gen = engine.generate(base, config, task.max_new_tokens, suffix_ids=suffix if suffix.numel() else None,
                          kept=decision.kept, block_size=block_size)
    statuses = coverage(decision.kept_masks(L), spans, decision.attention_rank)
    gains = {}
    for mode in MODES:
        kept = repaired(decision, spans, statuses, STATUSES_OF_MODE[mode], L)
        gains[mode] = None if kept is None else fit(kept).loglik - before.loglik
    ev = evidence_mask(spans, L)
    swaps = []
    for swap in sample_swaps(decision.units, m, units, seed):
        unit = decision.units[swap.unit]
        margin = fit(apply_swap(decision.kept, decision.units, swap, L)).loglik - before.loglik
        swaps.append({
            "layer": unit.layer, "head": unit.head, "out": swap.out_slot, "in": swap.in_slot,
            "out_rank": int(unit.rank[swap.out_slot]), "in_rank": int(unit.rank[swap.in_slot]),
            "margin": margin,
            "out_evidence": bool(ev[unit.tokens(swap.out_slot, L)].any()),
            "in_evidence": bool(ev[unit.tokens(swap.in_slot, L)].any()),
        })
    gap = full.loglik - before.loglik
    by_layer = [count_statuses([row]) for row in statuses]
    return {
        "uid": task.uid, "kind": task.kind, "protocol": protocol, "policy": policy_name(config),
        "budget": float(config.budget), "block_size": block_size, "slot_kind": decision.slot_kind,
        "prompt_tokens": len(task.prompt_ids), "compressed_tokens": L,
        "kept_per_head_mean": sum(int(i.numel()) for row in decision.kept for i in row) / (len(decision.kept) * len(decision.kept[0])),
        "spans": [s.to_json() for s in spans], "answer_tokens": int(target.numel()), "target_source": target_source,
        "loglik_full": full.loglik, "loglik_base": before.loglik, "gap": gap,
        "greedy_full": full.greedy, "greedy_base": before.greedy,
        "output": gen.text, "score": score(task, gen.text),
        "statuses": count_statuses(statuses), "statuses_by_layer": by_layer,
        "gains": gains, "dominant": dominant_mode(gap, gains, tol),
        "swaps": swaps, "positive_share": positive_share([s["margin"] for s in swaps], tol),
        "forwards": forwards, "seconds": time.perf_counter() - start,
    }
