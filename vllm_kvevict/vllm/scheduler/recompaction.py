"""When a head-granular request is recompacted during decode, and what it holds (scheduler side).

The scheduler counts the interval for head granularity, because the ``K'`` blocks a
recompaction copies into must be taken from the pool before the step that scores runs (as
``K`` is for the prompt): in the step whose length after it, ``seq_len``, is ``decode_interval``
tokens past the last eviction (the prompt's end at first), it orders ``K' =
compact_blocks_needed(config, seq_len, ...)`` blocks (the bound of the budget of the whole
length). The worker scores and recompacts in that step only. A request can be recompacted once
its prompt was compacted, or from the start when its prompt is kept whole
(``prompt_eviction="off"``, or a prompt whose compaction would gain nothing, such as a token cap
at least its length: every head holds every position).
"""

from __future__ import annotations

from typing import Iterable, Optional

from vllm_kvevict.cache import compact_blocks_needed
from vllm_kvevict.config import EvictionConfig


class Recompactions:
    """Per request: the length at its last eviction and, once it can be recompacted, the mean
    tokens kept per (layer, KV head) and where its tail starts (for the held-token gauge)."""

    def __init__(self) -> None:
        self._since: dict[str, int] = {}
        self._held: dict[str, tuple[float, int]] = {}
        self._ordered_at: dict[str, int] = {}

    def admit(self, req_id: str, config: EvictionConfig, prompt_len: int) -> None:
        self.forget([req_id])
        if config.resolved_granularity == "head" and config.evicts_during_decode:
            self._since[req_id] = prompt_len
            if not config.evicts_prompt:
                self._held[req_id] = (0.0, 0)  # positional: the whole length is its tail

    def kept_whole(self, req_id: str) -> None:
        """Its prompt was scored but left whole (nothing to gain, or no room): positional, it can
        be recompacted from its first interval, as with ``prompt_eviction="off"``."""
        if req_id in self._since:
            self._held[req_id] = (0.0, 0)

    def compacted(self, req_id: str, kept_mean: float, prompt_len: int) -> None:
        """Its prompt was compacted: it can be recompacted from now on."""
        if req_id in self._since:
            self._held[req_id] = (kept_mean, prompt_len)

    def due(self, req_id: str, config: EvictionConfig, seq_len: int, block_size: int, num_layers: int,
            num_kv_heads: int) -> Optional[int]:
        """``K'`` if a recompaction is due in the step ending at ``seq_len``, else ``None``. A
        budget of the whole length (nothing to evict) or a ``K'`` that does not fit before the
        new tail skips that interval."""
        since = self._since.get(req_id)
        if since is None or req_id not in self._held or seq_len - since < config.decode_interval:
            return None
        if config.budget_tokens(seq_len) >= seq_len:
            self._since[req_id] = seq_len
            return None
        k = compact_blocks_needed(config, seq_len, block_size, num_layers, num_kv_heads)
        if k > seq_len // block_size:
            self._since[req_id] = seq_len
            return None
        return k

    def ordered(self, req_id: str, seq_len: int) -> None:
        self._since[req_id] = seq_len
        self._ordered_at[req_id] = seq_len

    def installed(self, req_id: str, kept_per_head: list[int]) -> int:
        """A recompaction reached the block list: the tokens per head it evicted (mean)."""
        kept_mean, tail_start = self._held.get(req_id, (0.0, 0))
        at = self._ordered_at.pop(req_id, tail_start)
        new_mean = sum(kept_per_head) / max(1, len(kept_per_head))
        self._held[req_id] = (new_mean, at)
        return max(0, round(kept_mean + (at - tail_start) - new_mean))

    def forget(self, req_ids: Iterable[str]) -> None:
        for req_id in req_ids:
            self._since.pop(req_id, None)
            self._held.pop(req_id, None)
            self._ordered_at.pop(req_id, None)
