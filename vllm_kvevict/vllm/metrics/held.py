"""Tokens that running evicted requests hold, against what stock vLLM would hold (two gauges)."""

from __future__ import annotations

from typing import Any

from vllm_kvevict.vllm.metrics.stats import bounded_labels


class HeldTokens:
    """Scheduler ``Request`` objects counted in the held-token gauges, until released."""

    def __init__(self) -> None:
        #: request id -> (request, policy, granularity, tokens evicted over all passes).
        self._held: dict[str, tuple[Any, str, str, int]] = {}
        self.used = False

    def hold(self, request: Any, policy: str, granularity: str, evicted_tokens: int) -> None:
        """Count ``request``: logical = its ``num_computed_tokens``, held = logical - evicted."""
        previous = self._held.get(request.request_id)
        evicted = int(evicted_tokens) + (previous[3] if previous else 0)
        self._held[request.request_id] = (request, *bounded_labels(policy, granularity), evicted)
        self.used = True

    def release(self, req_id: str) -> None:
        self._held.pop(req_id, None)

    def totals(self) -> dict[tuple[str, str], tuple[int, int]]:
        """``(policy, granularity) -> (logical, kept)`` over held requests."""
        totals: dict[tuple[str, str], tuple[int, int]] = {}
        for request, policy, granularity, evicted in self._held.values():
            logical = int(request.num_computed_tokens)
            lg, kp = totals.get((policy, granularity), (0, 0))
            totals[(policy, granularity)] = (lg + logical, kp + max(0, logical - evicted))
        return totals
