"""One step's eviction plan: what the attention layers do for each batch row, as data.

Built once per step by the worker (:mod:`.worker.planner`) from the connector metadata and the
runner's batch, handed to the attention metadata builder, which attaches it to the step's
attention metadata; the attention impl only reads it (and writes its observations into the
per-request sinks it names). Nothing here imports the worker or the backends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Protocol

import torch

from vllm_kvevict.cache.page_table import CompactionPlan
from vllm_kvevict.policies.attention_sums import attention_paid

if TYPE_CHECKING:
    from vllm_kvevict.config import EvictionConfig
    from vllm_kvevict.policies import LayerScores, Policy
    from vllm_kvevict.vllm.model_info import ModelInfo


@dataclass
class KeyOnlyRegion:
    """VECTOR's key-only tokens of a compacted request (:class:`~vllm_kvevict.cache.KeyOnlyGather`):
    per layer ``[M_l]`` int64 (block, plane, slot, half) grouped by head, ``lens[l]`` per head,
    and the position each was copied from (its value is rebuilt from its key at that position
    by ``artifact``, a :class:`~vllm_kvevict.vector.VectorArtifact`, at every attention step)."""

    block: list[torch.Tensor]
    plane: list[torch.Tensor]
    slot: list[torch.Tensor]
    half: list[torch.Tensor]
    positions: list[torch.Tensor]
    lens: torch.Tensor  # [L, Hkv]
    artifact: Any

    def heads(self, layer: int) -> torch.Tensor:
        """``[M_l]`` the KV head of each of layer ``layer``'s entries."""
        return torch.repeat_interleave(torch.arange(self.lens.shape[1]), self.lens[layer])


@dataclass
class CompactRegion:
    """Where a compacted request's kept entries live: per layer ``[N_l]`` int64 (block, plane,
    slot) grouped by head, ``lens[l]`` entries per head; and where its positional tail starts."""

    block: list[torch.Tensor]
    plane: list[torch.Tensor]
    slot: list[torch.Tensor]
    lens: torch.Tensor  # [L, Hkv]
    #: first position of the tail (the length at the last eviction: the prompt's, then the
    #: length at each decode-time recompaction).
    tail_start: int
    #: index of the first tail block in the request's positional block list.
    first_tail_block: int
    #: per layer ``[N_l]`` int64, the position each entry was copied from (same order; ascending
    #: within a head): prompt positions after the prompt's eviction, held positions after a
    #: decode-time recompaction.
    positions: list[torch.Tensor] = field(default_factory=list)
    #: VECTOR's key-only tokens (``None`` without them); the fields above are the whole tokens.
    key_only: Optional[KeyOnlyRegion] = None

    @classmethod
    def from_plan(cls, plan: CompactionPlan, tail_start: int, artifact: Any = None) -> "CompactRegion":
        """The region ``plan`` fills; ``artifact``: VECTOR's, needed when the plan has key-only tokens."""
        entries = [_entries(plan.layer_gather(layer), plan.num_kv_heads) for layer in range(plan.num_layers)]
        block, plane, slot, positions = (list(t) for t in zip(*entries)) if entries else ([], [], [], [])
        key_only = None
        if plan.key_only is not None and int(plan.key_only.lens.sum()):
            if artifact is None:
                raise ValueError("a compaction with key-only tokens needs the VECTOR artifact that rebuilds them")
            gathers = [plan.key_only.layer_gather(layer) for layer in range(plan.num_layers)]
            ko_block, ko_plane, ko_slot, ko_positions = (list(t) for t in zip(*(_entries(g, plan.num_kv_heads)
                                                                                 for g in gathers)))
            key_only = KeyOnlyRegion(ko_block, ko_plane, ko_slot, [g.half.clone() for g in gathers], ko_positions,
                                     plan.key_only.lens.clone(), artifact)
        return cls(block, plane, slot, plan.lens.clone(), tail_start, tail_start // plan.block_size, positions,
                   key_only)

    def head_positions(self, layer: int) -> list[torch.Tensor]:
        """Per KV head, the positions of layer ``layer``'s entries."""
        return list(torch.split(self.positions[layer], self.lens[layer].tolist()))


def _entries(gather, num_kv_heads: int) -> tuple[torch.Tensor, ...]:
    return (gather.dst_page // num_kv_heads, gather.dst_page % num_kv_heads, gather.dst_slot,
            gather.src_positions.clone())


@dataclass
class Observations:
    """What the attention layers gather for one request while its prompt is prefilled (it lives
    across the prompt's chunks); the attention impl writes it, the worker reads it after the
    scoring step's forward."""

    policy: "Policy"
    config: "EvictionConfig"
    prompt_len: int
    #: layer index -> ``[w, H, d]`` window query chunks, in position order.
    window_queries: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    #: layer index -> running pre-RoPE query statistics (``policy.needs.query_stats``).
    query_stats: dict[int, Any] = field(default_factory=dict)
    #: layer index -> ``[H, prompt_len]`` attention paid by every prompt query so far.
    attention_sum: dict[int, torch.Tensor] = field(default_factory=dict)
    #: layer index -> the layer's scores, in the scoring step.
    scores: dict[int, "LayerScores"] = field(default_factory=dict)
    #: head granularity: the positional block ids covering the prompt (compaction sources).
    source_blocks: Optional[torch.Tensor] = None
    #: why observing failed (the request then stays whole), or ``None``.
    error: Optional[str] = None
    #: time spent observing and scoring in the attention layers, every chunk (the
    #: ``kvevict_scoring_seconds`` metric).
    seconds: float = 0.0
    #: time spent after the scoring step's forward selecting what to keep (allocation, ranking).
    selection_seconds: float = 0.0
    #: head granularity: time spent copying kept entries into head-pages and checking them.
    compaction_seconds: float = 0.0
    #: a stage to fail at on purpose (fault-injection tests, ``worker.faults``), or ``None``.
    fault: Optional[str] = None

    @property
    def total_seconds(self) -> float:
        """The whole eviction pass: scoring, selection, compaction (``kvevict_eviction_seconds``)."""
        return self.seconds + self.selection_seconds + self.compaction_seconds

    def fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason


@dataclass(frozen=True)
class RowObservation:
    """One batch row whose prompt is being prefilled: which of its query rows to observe.

    Its queries are ``query[query_offset : query_offset + num_queries]`` of the step, the first
    at position ``start``; ``window`` / ``collect``: ``(lo, hi)`` of those rows that are window
    positions / whose statistics are gathered; ``score``: this chunk completes the prompt;
    ``block_ids``: its positional blocks up to the chunk's end (read from the CPU block table
    when the step was planned, so no device read is needed).
    """

    req_id: str
    query_offset: int
    num_queries: int
    start: int
    window: tuple[int, int]
    collect: tuple[int, int]
    score: bool
    block_ids: torch.Tensor
    sink: Observations

    @property
    def prompt_len(self) -> int:
        return self.sink.prompt_len


@dataclass(frozen=True)
class HeadRow:
    """A batch row of a compacted request: it attends its compact region and positional tail.

    Its queries are ``query[query_offset : query_offset + num_queries]``, the last at position
    ``seq_len - 1``; ``tail_blocks``: its positional blocks from ``region.first_tail_block``.
    """

    req_id: str
    region: CompactRegion
    query_offset: int
    num_queries: int
    seq_len: int
    tail_blocks: torch.Tensor


@dataclass(frozen=True)
class TableRow:
    """A row's block table and length as vLLM's kernel must see them: page granularity drops
    evicted blocks (kept ones in order, then the tail); head granularity keeps the tail only."""

    block_ids: torch.Tensor  # [n] int32
    seq_len: int


@dataclass
class DecodeWindow:
    """Decode-time eviction of one page-evicted request, across its decode steps: the queries of
    its last ``window`` tokens run (the attention impl appends them every step) and, in a scoring
    step, every layer's scores of the held tokens (the worker reads them after the forward)."""

    window: int
    #: layer index -> ``[n <= window, H, d]`` post-RoPE queries of the last tokens, in order.
    queries: dict[int, torch.Tensor] = field(default_factory=dict)
    #: tokens whose queries were appended since admission (the window is full at ``>= window``).
    observed: int = 0
    scores: dict[int, "LayerScores"] = field(default_factory=dict)
    error: Optional[str] = None
    seconds: float = 0.0
    fault: Optional[str] = None
    #: h2o (``policy.needs.attention_sums``), page granularity: layer -> ``[H, held]`` attention
    #: paid to each held token (in held order) by every query run so far: the prompt's (kept
    #: tokens' sums, set when the prompt completes; ``None`` before), then each decode step's;
    #: the columns of evicted blocks are dropped at each eviction.
    attention_sum: Optional[dict[int, torch.Tensor]] = None

    def append(self, layer: int, queries: torch.Tensor) -> None:
        q = queries.detach().float().clone()
        held = self.queries.get(layer)
        q = q if held is None else torch.cat([held, q], dim=0)
        self.queries[layer] = q[-self.window :]

    def start_sums(self, prompt_sums: dict[int, torch.Tensor], kept: torch.Tensor, extra: int = 0) -> None:
        """The prompt's sums ``[H, prompt_len]`` of its ``kept`` positions, plus ``extra`` zero
        columns: tokens past the prompt run in its last chunk (a re-prefill after preemption),
        whose attention received so far is not counted."""
        self.attention_sum = {
            layer: torch.cat([s[:, kept].float(), s.new_zeros(s.shape[0], extra)], dim=1)
            for layer, s in prompt_sums.items()
        }

    def add_attention(self, layer: int, queries: torch.Tensor, keys: torch.Tensor, scale: float) -> None:
        """A step's ``queries [H, n, d]`` (the last ``n`` of the held ``keys [Hkv, T, d]``) add
        their attention over the held tokens to layer ``layer``'s sums (``n`` new columns)."""
        if self.attention_sum is None or layer not in self.attention_sum:
            raise RuntimeError(f"no attention sums of the prompt for layer {layer}")
        held, n = keys.shape[1], queries.shape[1]
        sums = self.attention_sum[layer]
        if sums.shape[1] != held - n:
            raise RuntimeError(f"attention sums cover {sums.shape[1]} held tokens, expected {held - n}")
        sums = torch.cat([sums, sums.new_zeros(sums.shape[0], n)], dim=1)
        self.attention_sum[layer] = sums + attention_paid(queries, keys, scale)

    def drop_blocks(self, held_blocks: list[int], block_size: int) -> None:
        """After an eviction: drop the sums of the evicted held blocks (indices into the held
        blocks, each full: every held block but the last is)."""
        if self.attention_sum is None or not held_blocks:
            return
        for layer, sums in self.attention_sum.items():
            keep = torch.ones(sums.shape[1], dtype=torch.bool)
            for b in held_blocks:
                keep[b * block_size : (b + 1) * block_size] = False
            self.attention_sum[layer] = sums[:, keep]

    def fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason

    def reset_scores(self) -> None:
        self.scores, self.error, self.seconds = {}, None, 0.0


@dataclass(frozen=True)
class DecodeRow:
    """A batch row of a page-evicted request with decode-time eviction: its queries join its
    window; with ``score`` (``decode_interval`` tokens since the last eviction) its held tokens
    are scored after the stock kernel wrote this step's K/V.

    ``held_blocks``: the held positional block ids in order (those the stock kernel reads),
    ``held_index``: their indices in the positional block list, ``held_len`` tokens in all, at
    logical ``positions``; ``seq_len``: the request's length after this step.
    """

    req_id: str
    query_offset: int
    num_queries: int
    seq_len: int
    score: bool
    held_blocks: torch.Tensor
    held_index: torch.Tensor
    positions: torch.Tensor
    sink: DecodeWindow
    policy: "Policy"

    @property
    def held_len(self) -> int:
        return int(self.positions.numel())


@dataclass(frozen=True)
class HeadDecodeRow:
    """A batch row of a head-granular request with decode-time eviction: its queries join its
    window; with ``score`` (the scheduler ordered ``compact_blocks`` for this step, every
    ``decode_interval`` tokens) each (layer, KV head)'s held tokens, its compact region then
    the positional tail from ``tail_start``, are scored after the stock kernel wrote this
    step's K/V, and recompacted into ``compact_blocks`` after the forward.

    ``region``: ``None`` while the request is still positional (``prompt_eviction="off"``,
    before its first eviction: every head holds ``0 .. seq_len - 1``); ``tail_blocks``: its
    positional block ids from ``first_tail_block``; ``seq_len``: its length after this step.
    """

    req_id: str
    query_offset: int
    num_queries: int
    seq_len: int
    score: bool
    region: Optional[CompactRegion]
    tail_blocks: torch.Tensor
    compact_blocks: tuple[int, ...]
    sink: DecodeWindow
    policy: "Policy"

    @property
    def tail_start(self) -> int:
        return self.region.tail_start if self.region is not None else 0

    @property
    def first_tail_block(self) -> int:
        return self.region.first_tail_block if self.region is not None else 0

    def held_positions(self, layer: int, num_kv_heads: int) -> list[torch.Tensor]:
        """Per KV head, the positions layer ``layer`` holds (region, then tail), ascending."""
        tail = torch.arange(self.tail_start, self.seq_len)
        if self.region is None:
            return [tail.clone() for _ in range(num_kv_heads)]
        return [torch.cat([p, tail]) for p in self.region.head_positions(layer)]


@dataclass(frozen=True)
class EvictionStep:
    """Everything the attention layers do for eviction in one step, by batch row."""

    observe: dict[int, RowObservation]
    head_rows: dict[int, HeadRow]
    table_rows: dict[int, TableRow]
    model: "ModelInfo"
    #: page rows (:class:`DecodeRow`) and head rows (:class:`HeadDecodeRow`) of decode-time eviction.
    decode: dict[int, "DecodeRow | HeadDecodeRow"] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.observe or self.head_rows or self.table_rows or self.decode)


class StepSource(Protocol):
    """Where an attention metadata builder finds the step's plan (the worker side of our KV
    connector implements it)."""

    def current_step(self) -> Optional[EvictionStep]: ...

    def bind_layout(self, layer_names: list[str], layout: Any) -> None: ...


def step_source() -> Optional[StepSource]:
    """This worker's :class:`StepSource`, or ``None`` when our KV connector is not configured."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    if not has_kv_transfer_group():
        return None
    return getattr(get_kv_transfer_group(), "eviction_steps", None)
