"""How the check judges a served eviction against the reference engine (as tests/kept_sets.py does).

For a request evicted by the served plugin: its recorded scores against the reference engine's
(``policy.score_layer`` on HF transformers' per-layer tensors) — same protected / preferred
positions and fixed head budgets, values within a tolerance of each row's largest unprotected
reference value; its kept set (head) or evicted blocks (page) exactly what the shared selection
makes of the served scores; its greedy tokens against the reference engine's generation over the
served kept set. Also reported, not judged: how much of the reference's own kept set it shares
(a difference there is a near-tie of the scores).

With VECTOR (``kv_vector on``) also: the served residuals against the reference's (as the
values), the key-only sets exactly the shared ``plan_vector``'s of the served scores (some key-only
token held), the greedy tokens against the reference's generation with the same key-only tokens
and the same reconstruction (the artifact's), and every key-only token taken by decode attention
in every decode step (:func:`key_only_attended`, from ``inprocess.key_only_reads``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

#: score tolerance by the engine's dtype (float32: the CPU tests' 1e-3 measured 2e-6..1e-4; GPU
#: GEMMs and attention reorder sums; float16: its 2^-11 rounding through two layers).
SCORE_TOL = {"float32": 5e-3, "float16": 3e-2, "bfloat16": 1e-1}


def score_error(served: list, reference: list) -> tuple[bool, float]:
    """``(masks and head budgets equal in every layer, largest relative value error)``; with
    VECTOR's residuals (``LayerScores.residuals``) their error counts too, and which are infinite
    is a mask."""
    same, worst = len(served) == len(reference), 0.0
    for s, r in zip(served, reference):
        same &= tuple(s.values.shape) == tuple(r.values.shape) and torch.equal(s.protected, r.protected)
        same &= _same(s.preferred, r.preferred) and _same(s.head_budgets, r.head_budgets)
        same &= (s.residuals is None) == (r.residuals is None)
        if tuple(s.values.shape) != tuple(r.values.shape):
            continue
        worst = max(worst, _relative_error(s.values, r.values, ~r.protected))
        if s.residuals is not None and r.residuals is not None:
            finite = torch.isfinite(r.residuals)
            same &= torch.equal(torch.isfinite(s.residuals), finite)
            worst = max(worst, _relative_error(s.residuals, r.residuals, ~r.protected & finite))
    return bool(same), worst


def _relative_error(served: torch.Tensor, reference: torch.Tensor, counted: torch.Tensor) -> float:
    """Largest ``|served - reference|`` over ``counted``, relative to each row's largest counted
    ``|reference|``."""
    zero = torch.zeros_like(reference)
    scale = torch.where(counted, reference.abs(), zero).amax(-1, keepdim=True).clamp_min(1e-30)
    err = torch.where(counted, (served.float() - reference).abs() / scale, zero)
    return float(err.max()) if err.numel() else 0.0


def _same(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a.cpu(), b.cpu()))


def shared_fraction(kept: list, other: list) -> float:
    """Mean over (layer, KV head) of |kept ∩ other| / |kept ∪ other|."""
    values = []
    for la, lb in zip(kept, other):
        for a, b in zip(la, lb):
            sa, sb = set(a.tolist()), set(b.tolist())
            values.append(len(sa & sb) / max(1, len(sa | sb)))
    return sum(values) / max(1, len(values))


def key_only_attended(reads: list, key_only: list, decode_steps: int) -> tuple[bool, dict]:
    """Whether decode attention took all of a request's key-only tokens, in every layer holding
    some, in at least ``decode_steps`` calls, and took none elsewhere: ``(passed, {layer: [tokens
    held, calls that took exactly those]})``. ``reads``: ``inprocess.key_only_reads``'s ``(path,
    layer, tokens)`` over a batch where this request is the only one holding key-only tokens
    (a GPU call takes every row's at once)."""
    held = {layer: sum(int(t.numel()) for t in heads) for layer, heads in enumerate(key_only)}
    calls = {layer: sum(1 for _, at, n in reads if at == layer and n == count) for layer, count in held.items()}
    stray = [r for r in reads if r[2] != held.get(r[1], 0) or r[2] == 0]
    passed = sum(held.values()) > 0 and not stray and all(calls[l] >= decode_steps for l, n in held.items() if n)
    return bool(passed), {layer: [held[layer], calls[layer]] for layer in held}


def kept_without_blocks(evicted: list[int], prompt_len: int, block_size: int, num_layers: int,
                        num_kv_heads: int) -> list:
    """Page granularity's kept positions, every (layer, KV head) alike."""
    keep = torch.ones(prompt_len, dtype=torch.bool)
    for b in evicted:
        keep[b * block_size : (b + 1) * block_size] = False
    positions = torch.arange(prompt_len)[keep]
    return [[positions.clone() for _ in range(num_kv_heads)] for _ in range(num_layers)]


def judge(name: str, flat: dict, served: dict, engine: Any, prefilled: Any, block_size: int, dtype: str,
          new_tokens: int) -> dict:
    """The verdict on one evicting request (``served``: tokens, scores and kept / evicted)."""
    from vllm_kvevict.config import EvictionConfig
    from vllm_kvevict.policies import build_policy

    config = EvictionConfig.from_flat(flat)
    policy = build_policy(config, block_size, model=prefilled.model)
    reference = [policy.score_layer(layer) for layer in prefilled.layer_inputs(config)]
    out: dict[str, Any] = {"request": name, "policy": flat, "failure": served.get("failure")}
    scores = served.get("scores")
    if scores is None or out["failure"]:
        out.update(evicted=False, passed=False)
        return out
    masks, err = score_error(scores, reference)
    length = prefilled.prompt_len
    if config.resolved_granularity == "head":
        kept = served["kept"]
        replanned = policy.plan_head(scores, length)
        exact = _same_sets(kept.indices, replanned.indices) and torch.equal(kept.head_budgets, replanned.head_budgets)
        own_set = policy.plan_head(reference, length)
        own, kept_indices, routed = own_set.indices, kept.indices, kept
        held = float(kept.head_budgets.float().mean()) / length
        if config.vector == "on":
            ko, want = kept.key_only, replanned.key_only
            exact &= ko is not None and want is not None and _same_sets(ko, want)
            attended, per_layer = key_only_attended(served.get("key_only_reads") or [], ko or [], new_tokens - 1)
            shared_ko = shared_fraction(ko, own_set.key_only) if ko and own_set.key_only else None
            out.update(key_only_tokens=sum(int(t.numel()) for heads in ko or [] for t in heads),
                       key_only_attended=attended, key_only_reads=per_layer,
                       key_only_shared=None if shared_ko is None else round(shared_ko, 4))
    else:
        evicted = served["evicted"]
        exact = policy.evicted_blocks(scores, length) == list(evicted)
        layers, heads = len(scores), scores[0].values.shape[0]
        kept_indices = kept_without_blocks(evicted, length, block_size, layers, heads)
        own = kept_without_blocks(policy.evicted_blocks(reference, length), length, block_size, layers, heads)
        held = 1 - len(evicted) * block_size / length
        routed = kept_indices
    tokens = list(engine.generate(prefilled, config, new_tokens, stop_on_eos=False, kept=routed,
                                  block_size=block_size).token_ids)
    tol = SCORE_TOL.get(dtype, 1e-1)
    out.update(
        evicted=True, kept_share=round(held, 3), masks_equal=masks, score_rel_err=err, score_tol=tol,
        selection_exact=bool(exact), shared_with_reference=round(shared_fraction(kept_indices, own), 4),
        tokens_equal_reference=tokens == served["tokens"], tokens_required=dtype == "float32",
    )
    out["passed"] = bool(masks and err <= tol and exact and (out["tokens_equal_reference"] or dtype != "float32")
                         and out.get("key_only_attended", True))
    return out


def _same_sets(kept: list, other: list) -> bool:
    return len(kept) == len(other) and all(
        len(la) == len(lb) and all(torch.equal(a, b) for a, b in zip(la, lb)) for la, lb in zip(kept, other))
