"""The ``kvevict_*`` observations of one interval, as KV-connector stats (plain, msgpack-safe lists)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Optional

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from vllm_kvevict.config import GRANULARITIES, SCORERS

PREFIX = "kvevict_"
#: Eviction-pass durations, seconds (a pass is scoring-free bookkeeping: well under a second).
EVICTION_SECONDS_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: Scoring durations, seconds (all layers of one request; CPU scoring of long prompts is slow).
SCORING_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Ratios in [0, 1] (compression: kept / logical; efficiency: ideal / held).
RATIO_BUCKETS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
#: Kept tokens of one (layer, KV head).
HEAD_TOKENS_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
#: Label value for a policy or granularity outside the known sets (keeps label sets bounded).
OTHER = "other"
#: ``outcome`` label values of ``kvevict_requests_total``.
OUTCOMES = ("evicted", "skipped_short", "opted_out", "rejected", "error", "decode_only")
#: ``stage`` label values of ``kvevict_errors_total``.
ERROR_STAGES = ("scoring", "selection", "compaction", "invariant", "free")
HEAD_STATS = ("min", "mean", "max")

_EVICTIONS = "evictions"  # [[policy, granularity, tokens, blocks, seconds], ...]
_BLOCKS_RETURNED = "blocks_returned"  # [n, ...]
_BYTES_RETURNED = "bytes_returned"  # [n, ...]
_OUTCOMES = "outcomes"  # [[policy, granularity, outcome], ...]
_SCORING = "scoring"  # [[policy, granularity, seconds], ...]
_MEMORY = "memory"  # [[policy, granularity, ideal_blocks, held_blocks, logical, kept], ...]
_HEADS = "head_budgets"  # [[policy, granularity, [kept per (layer, head)]], ...]
_ERRORS = "errors"  # [stage, ...]
_HELD = "held"  # latest snapshot: [[policy, granularity, logical, kept], ...]
_POOL = "pool"  # latest snapshot: [num_blocks, block_size, bytes_per_block]
_DECODE = "decode"  # decode-time evictions: [[policy, granularity, evictions, blocks returned], ...]
_LISTS = (_EVICTIONS, _BLOCKS_RETURNED, _BYTES_RETURNED, _OUTCOMES, _SCORING, _MEMORY, _HEADS, _ERRORS, _DECODE)
_SNAPSHOTS = (_HELD, _POOL)


def bounded_labels(policy: str, granularity: str) -> tuple[str, str]:
    """``(policy, granularity)``, each replaced by ``other`` outside its closed set."""
    return (policy if policy in SCORERS else OTHER, granularity if granularity in GRANULARITIES else OTHER)


@dataclass
class EvictionStats(KVConnectorStats):
    """Eviction observations of one interval; ``data`` is plain lists (msgpack-serialisable)."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = {key: [] for key in _LISTS}

    def record(self, policy: str, granularity: str, tokens: int, blocks: int, seconds: float) -> None:
        """One eviction pass of one request (also counts the ``evicted`` outcome)."""
        policy, granularity = bounded_labels(policy, granularity)
        self.data[_EVICTIONS].append([policy, granularity, int(tokens), int(blocks), float(seconds)])
        self.record_outcome(policy, granularity, "evicted")

    def record_outcome(self, policy: str, granularity: str, outcome: str) -> None:
        """One request's fate: one of :data:`OUTCOMES`."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        self.data.setdefault(_OUTCOMES, []).append([*bounded_labels(policy, granularity), outcome])

    def record_scoring(self, policy: str, granularity: str, seconds: float) -> None:
        """Time spent scoring one request (all layers)."""
        self.data.setdefault(_SCORING, []).append([*bounded_labels(policy, granularity), float(seconds)])

    def record_blocks_returned(self, num_blocks: int, num_bytes: int = 0) -> None:
        """Blocks handed back to vLLM's free pool (and their KV-cache bytes)."""
        if num_blocks:
            self.data[_BLOCKS_RETURNED].append(int(num_blocks))
        if num_bytes:
            self.data.setdefault(_BYTES_RETURNED, []).append(int(num_bytes))

    def record_decode_evictions(self, policy: str, evictions: int, blocks: int, granularity: str = "page") -> None:
        """Decode-time evictions of one request and the blocks they returned (those are also in
        :meth:`record_blocks_returned`)."""
        if evictions or blocks:
            self.data.setdefault(_DECODE, []).append([*bounded_labels(policy, granularity), int(evictions), int(blocks)])

    def record_memory(
        self, policy: str, granularity: str, ideal_blocks: int, held_blocks: int, logical_tokens: int, kept_tokens: int
    ) -> None:
        """One request after eviction: blocks held against the ideal, tokens kept of the logical."""
        self.data.setdefault(_MEMORY, []).append(
            [*bounded_labels(policy, granularity), int(ideal_blocks), int(held_blocks), int(logical_tokens), int(kept_tokens)]
        )

    def record_head_budgets(self, policy: str, granularity: str, kept_per_head: list[int]) -> None:
        """Kept tokens of every (layer, KV head) of one eviction."""
        if len(kept_per_head):
            self.data.setdefault(_HEADS, []).append([*bounded_labels(policy, granularity), [int(k) for k in kept_per_head]])

    def record_error(self, stage: str) -> None:
        """A failure that left a request whole; ``stage`` is one of :data:`ERROR_STAGES`."""
        self.data.setdefault(_ERRORS, []).append(stage if stage in ERROR_STAGES else OTHER)

    def set_held(self, totals: dict[tuple[str, str], tuple[int, int]]) -> None:
        """Current ``(policy, granularity) -> (logical, kept)`` tokens of running evicted requests."""
        self.data[_HELD] = [[p, g, int(logical), int(kept)] for (p, g), (logical, kept) in sorted(totals.items())]

    def set_pool(self, num_blocks: int, block_size: int, bytes_per_block: int) -> None:
        self.data[_POOL] = [int(num_blocks), int(block_size), int(bytes_per_block)]

    def aggregate(self, other: KVConnectorStats) -> "EvictionStats":
        if not other.is_empty():
            for key in _LISTS:
                self.data.setdefault(key, []).extend(other.data.get(key, []))
            for key in _SNAPSHOTS:  # the later snapshot wins
                if key in other.data:
                    self.data[key] = other.data[key]
        return self

    def reduce(self) -> dict[str, int | float]:
        evictions = self.data.get(_EVICTIONS, [])
        return {
            "kvevict requests evicted": len(evictions),
            "kvevict tokens evicted": sum(e[2] for e in evictions),
            "kvevict blocks evicted": sum(e[3] for e in evictions),
            "kvevict blocks returned": sum(self.data.get(_BLOCKS_RETURNED, [])),
            "kvevict eviction seconds": round(sum(e[4] for e in evictions), 6),
            "kvevict errors": len(self.data.get(_ERRORS, [])),
            "kvevict decode evictions": sum(d[-2] for d in self.data.get(_DECODE, [])),
            "kvevict decode blocks returned": sum(d[-1] for d in self.data.get(_DECODE, [])),
        }

    def is_empty(self) -> bool:
        return not any(self.data.get(key) for key in _LISTS) and not any(key in self.data for key in _SNAPSHOTS)


class EvictionStatsRecorder:
    """Thread-safe accumulator owned by one connector instance; :meth:`take` drains it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = EvictionStats()
        self._last_held: Optional[list] = None
        self._block_bytes = 0

    def record(self, policy: str, granularity: str, tokens: int, blocks: int, seconds: float) -> None:
        with self._lock:
            self._stats.record(policy, granularity, tokens, blocks, seconds)

    def record_outcome(self, policy: str, granularity: str, outcome: str) -> None:
        with self._lock:
            self._stats.record_outcome(policy, granularity, outcome)

    def record_scoring(self, policy: str, granularity: str, seconds: float) -> None:
        with self._lock:
            self._stats.record_scoring(policy, granularity, seconds)

    def record_blocks_returned(self, num_blocks: int, num_bytes: Optional[int] = None) -> None:
        """``num_bytes`` defaults to ``num_blocks`` times the block bytes of :meth:`set_pool`."""
        if num_bytes is None:
            num_bytes = num_blocks * self._block_bytes
        with self._lock:
            self._stats.record_blocks_returned(num_blocks, num_bytes)

    def record_decode_evictions(self, policy: str, evictions: int, blocks: int, granularity: str = "page") -> None:
        with self._lock:
            self._stats.record_decode_evictions(policy, evictions, blocks, granularity)

    def record_memory(
        self, policy: str, granularity: str, ideal_blocks: int, held_blocks: int, logical_tokens: int, kept_tokens: int
    ) -> None:
        with self._lock:
            self._stats.record_memory(policy, granularity, ideal_blocks, held_blocks, logical_tokens, kept_tokens)

    def record_head_budgets(self, policy: str, granularity: str, kept_per_head: list[int]) -> None:
        with self._lock:
            self._stats.record_head_budgets(policy, granularity, kept_per_head)

    def record_error(self, stage: str) -> None:
        with self._lock:
            self._stats.record_error(stage)

    def set_held(self, totals: dict[tuple[str, str], tuple[int, int]]) -> None:
        """Send the held-token totals with the next :meth:`take`, if they changed."""
        with self._lock:
            probe = EvictionStats()
            probe.set_held(totals)
            if probe.data[_HELD] != self._last_held:
                self._stats.data[_HELD] = self._last_held = probe.data[_HELD]

    def set_pool(self, num_blocks: int, block_size: int, bytes_per_block: int) -> None:
        self._block_bytes = int(bytes_per_block)
        with self._lock:
            self._stats.set_pool(num_blocks, block_size, bytes_per_block)

    def take(self) -> Optional[EvictionStats]:
        """The stats since the last call, or None if nothing happened."""
        with self._lock:
            if self._stats.is_empty():
                return None
            stats, self._stats = self._stats, EvictionStats()
            return stats


def build_kv_connector_stats(data: Optional[dict[str, Any]] = None) -> EvictionStats:
    """For the connector's ``build_kv_connector_stats`` classmethod."""
    return EvictionStats(data=data if data is not None else {})
