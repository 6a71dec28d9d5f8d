"""Continuing a generation on its own (evicted) cache: forced tokens, then greedy tokens again.

A greedy generation stops with its last chosen token not yet run (nothing reads its K/V).
:class:`Continuation` keeps what is needed to go on: the per-head cache as eviction left it,
the decode-time evictor (its window and its count since the last eviction), the pending token
and the position it takes. :func:`continue_forced` runs the pending token, then the forced
tokens one at a time, exactly as if the model had chosen them (with decode-time eviction on,
they count towards the interval and join the window, and an eviction may fall among them),
then decodes greedily again. A continuation with no forced tokens is the uninterrupted
generation, token for token and eviction for eviction.

What it is for: asking a question about what the model wrote, on the cache that long
output left behind (:mod:`vllm_kvevict.evaluation.self_recall`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from vllm_kvevict.reference.decode_eviction import DecodeEviction, DecodeEvictor
from vllm_kvevict.reference.forward import greedy_loop, run_tokens
from vllm_kvevict.reference.head_cache import HeadCache
from vllm_kvevict.reference.model_parts import DecoderParts


@dataclass
class Continuation:
    """Where a generation stopped.

    Attributes
    ----------
    cache : the per-head cache (what the evictions left, then every token run since).
    evictor : the generation's decode-time evictor (``None`` without decode-time eviction).
    pending : the last chosen token, not run yet.
    position : the position ``pending`` takes.
    """

    cache: HeadCache
    evictor: Optional[DecodeEvictor]
    pending: int
    position: int


@dataclass
class Continued:
    """What :func:`continue_forced` produced: the greedy tokens after the forced ones (the EOS
    that stopped them included), where it stopped, and the decode-time evictions made during it
    (forced tokens included)."""

    token_ids: list[int]
    state: Continuation
    decode_evictions: list[DecodeEviction] = field(default_factory=list)


def continuation_of(cache: HeadCache, evictor: Optional[DecodeEvictor], tokens: Sequence[int],
                    first_position: int) -> Continuation:
    """The state after greedy ``tokens`` whose first was (to be) run at ``first_position``."""
    if not tokens:
        raise ValueError("a generation with no token cannot be continued (max_new_tokens >= 1)")
    return Continuation(cache, evictor, int(tokens[-1]), first_position + len(tokens) - 1)


@torch.no_grad()
def continue_forced(parts: DecoderParts, state: Continuation, forced_ids: Sequence[int], max_new_tokens: int,
                    stop_ids: frozenset[int]) -> Continued:
    """Run ``state.pending`` and ``forced_ids`` on ``state.cache``, then decode greedily.

    The cache (and evictor) in ``state`` are advanced in place; the returned state is where this
    continuation stopped.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    cache, evictor = state.cache, state.evictor
    before = len(evictor.evictions) if evictor is not None else 0

    def feed(token: int, at: int) -> torch.Tensor:
        if evictor is not None:
            return evictor.run(cache, token, at)
        return run_tokens(parts, cache, torch.tensor([token]), torch.tensor([at]))[0]

    position = state.position
    logits = None
    for token in [state.pending, *(int(t) for t in forced_ids)]:
        logits = feed(token, position)
        position += 1
    tokens, _ = greedy_loop(feed, logits, position, max_new_tokens, stop_ids)
    made = evictor.evictions[before:] if evictor is not None else []
    return Continued(tokens, continuation_of(cache, evictor, tokens, position), list(made))
