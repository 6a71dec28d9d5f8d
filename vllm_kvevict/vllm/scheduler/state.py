"""What the scheduler side remembers per engine core: policies, frozen requests, pending blocks.

One :class:`SchedulerEvictionState` per engine core, attached to its ``KVCacheManager`` (and
coordinator) so that the prefix-cache hooks find it (:func:`state_of`).

* the resolved policy of every admitted request (:meth:`config_for`: resolved once);
* *frozen* requests: from their eviction on, none of their blocks enters the prefix cache
  (blocks filled after eviction were computed against an evicted context; prompt blocks cached
  before it, kept or freed, hold unchanged, valid contents);
* head granularity: compact blocks taken for a request but not yet in its block list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.vllm.request_policy import extra_args_of, resolve_request_policy


@dataclass
class PendingCompaction:
    """Compact blocks taken for a request, not yet in its block list."""

    blocks: list  # vLLM KVCacheBlock
    first_tail_block: int
    generation: int
    #: a decode-time recompaction (region + tail into fresh blocks), not the prompt's compaction.
    decode: bool = False


class SchedulerEvictionState:
    def __init__(self, server_default: Optional[EvictionConfig] = None) -> None:
        self.server_default = server_default or EvictionConfig()
        #: request id -> resolved policy (``None``: left whole).
        self._configs: dict[str, Optional[EvictionConfig]] = {}
        self.frozen: set[str] = set()
        self.blocks_returned = 0
        self.pending_compactions: dict[str, PendingCompaction] = {}

    def config_for(self, request: Any) -> Optional[EvictionConfig]:
        """The policy of a scheduler ``Request``, resolved on first use and kept."""
        req_id = request.request_id
        if req_id not in self._configs:
            self._configs[req_id] = resolve_request_policy(extra_args_of(request), self.server_default)
        return self._configs[req_id]

    def known_config(self, req_id: str) -> Optional[EvictionConfig]:
        """The policy :meth:`config_for` resolved for ``req_id`` (``None`` if unknown or whole)."""
        return self._configs.get(req_id)

    def prefix_hit_cap(self, request: Any, block_size: int) -> Optional[int]:
        """Most prompt tokens a prefix-cache hit may cover for this request, or ``None``.

        Queries are not cached, so an evicting request recomputes every query its scorer reads:
        the last ``window`` positions for window scorers; every prompt position for scorers that
        read all of them (h2o's attention sums, expected_attention's query statistics: no hit at
        all). The same prompt then gets the same scores with prefix caching on or off.
        """
        from vllm_kvevict.policies import build_policy

        cfg = self.config_for(request)
        if cfg is None:
            return None
        needs = build_policy(cfg, block_size).needs
        if needs.query_stats or needs.attention_sums:
            return 0
        cap = max(0, request.num_prompt_tokens - cfg.window)
        return (cap // block_size) * block_size

    def forget(self, req_ids: Iterable[str]) -> None:
        for req_id in req_ids:
            self.frozen.discard(req_id)

    def finished(self, req_id: str) -> None:
        self.frozen.discard(req_id)
        self._configs.pop(req_id, None)


#: Attribute under which the state hangs on vLLM's ``KVCacheManager`` and its coordinator (one
#: state per engine core, even with several in-process engines).
STATE_ATTR = "_kvevict_state"


def attach_state(kv_cache_manager: Any, state: SchedulerEvictionState) -> None:
    setattr(kv_cache_manager, STATE_ATTR, state)
    setattr(kv_cache_manager.coordinator, STATE_ATTR, state)


def state_of(owner: Any) -> Optional[SchedulerEvictionState]:
    """The state attached to a ``KVCacheManager`` or coordinator, ``None`` if eviction is off."""
    return getattr(owner, STATE_ATTR, None)
