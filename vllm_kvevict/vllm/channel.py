"""What the KV connector carries between the scheduler and the workers (nothing is transferred).

Scheduler -> worker, every step (:class:`KVEvictConnectorMetadata`): requests to forget (their
blocks changed under them: finished, preempted, resumed), the resolved policy of every request
admitted this step (resolved once, at admission: :mod:`.request_policy`), and the ``K`` compact
blocks of head-granular requests whose prompt completes this step.

Worker -> scheduler (:class:`KVEvictWorkerMetadata`): what each eviction did, echoing the
admission it belongs to (a report about an earlier admission of a preempted request is stale).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata

from vllm_kvevict.config import EvictionConfig


@dataclass(frozen=True)
class Admission:
    """A request that may evict, as the scheduler admitted it."""

    config: EvictionConfig
    prompt_len: int
    #: how many times the scheduler admitted it (new or resumed), echoed in reports.
    generation: int
    #: a stage to fail at on purpose (fault-injection tests only: ``SchedulerSide.fault_key``).
    fault: Optional[str] = None


@dataclass
class KVEvictConnectorMetadata(KVConnectorMetadata):
    reset_req_ids: set[str] = field(default_factory=set)
    admissions: dict[str, Admission] = field(default_factory=dict)
    #: head granularity: request id -> its ``K`` compact block ids (prompt completes this step, or
    #: ``decode_interval`` tokens were run since its last eviction: a decode-time recompaction).
    compact_orders: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class KVEvictWorkerMetadata(KVConnectorWorkerMetadata):
    """One step's (or several steps') eviction reports of one worker."""

    #: page granularity: request id -> evicted positional block indices.
    evicted: dict[str, list[int]] = field(default_factory=dict)
    #: decode-time eviction: request id -> positional block indices evicted since the last report.
    decode_evicted: dict[str, list[int]] = field(default_factory=dict)
    #: decode-time eviction: request id -> evictions since the last report (for the metrics).
    decode_count: dict[str, int] = field(default_factory=dict)
    #: head granularity: request id -> tokens kept per (layer, KV head), compaction done.
    head_compacted: dict[str, list[int]] = field(default_factory=dict)
    #: decode-time eviction at head granularity: request id -> tokens kept per (layer, KV head)
    #: of its recompaction (its order's blocks swapped in; old compact and consumed tail blocks freed).
    decode_compacted: dict[str, list[int]] = field(default_factory=dict)
    #: head granularity: orders not used (left whole, or compaction failed): blocks go back.
    head_failed: set[str] = field(default_factory=set)
    #: request id -> the admission generation the report belongs to.
    generations: dict[str, int] = field(default_factory=dict)
    #: request id -> (policy, seconds of its eviction pass), for the metrics.
    passes: dict[str, tuple[str, float]] = field(default_factory=dict)

    def is_empty(self) -> bool:
        return not (self.evicted or self.decode_count or self.head_compacted or self.head_failed
                    or self.decode_compacted)

    def merge(self, other: "KVEvictWorkerMetadata") -> None:
        """Add ``other``'s reports (a later step of the same worker) into this one."""
        self.evicted.update(other.evicted)
        for req_id, blocks in other.decode_evicted.items():  # several evictions: every block freed
            self.decode_evicted[req_id] = sorted(set(self.decode_evicted.get(req_id, [])) | set(blocks))
        for req_id, count in other.decode_count.items():
            self.decode_count[req_id] = self.decode_count.get(req_id, 0) + count
        self.head_compacted.update(other.head_compacted)
        self.decode_compacted.update(other.decode_compacted)
        self.head_failed |= other.head_failed
        self.generations.update(other.generations)
        self.passes.update(other.passes)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        """Across workers. Tensor parallelism is refused at startup (:mod:`.startup`), so there
        is one worker; should there be more, ranks that disagree on pages evict none."""
        merged = KVEvictWorkerMetadata(
            evicted=dict(self.evicted), decode_evicted=dict(self.decode_evicted),
            decode_count=dict(self.decode_count), head_compacted=dict(self.head_compacted),
            decode_compacted=dict(self.decode_compacted),
            head_failed=set(self.head_failed), generations=dict(self.generations), passes=dict(self.passes),
        )
        for req_id, blocks in getattr(other, "evicted", {}).items():
            if merged.evicted.get(req_id, blocks) != blocks:
                merged.evicted[req_id] = []
            else:
                merged.evicted[req_id] = blocks
        for req_id, blocks in getattr(other, "decode_evicted", {}).items():
            if merged.decode_evicted.get(req_id, blocks) != blocks:
                merged.decode_evicted[req_id] = []
        for req_id, count in getattr(other, "decode_count", {}).items():
            merged.decode_count.setdefault(req_id, count)
        for req_id, kept in getattr(other, "decode_compacted", {}).items():
            merged.decode_compacted.setdefault(req_id, kept)
        merged.head_failed |= set(getattr(other, "head_failed", ()))
        for name in ("generations", "passes"):
            for key, value in getattr(other, name, {}).items():
                getattr(merged, name).setdefault(key, value)
        return merged
