"""Scheduler side: evicted pages leave the request's block list and go back to vLLM's pool.

:class:`SchedulerEvictionState` (one per engine core, attached to its ``KVCacheManager``: :func:`state_of`) holds

* the server's default policy, to know which requests may evict (:meth:`config_for`);
* the requests that evicted: from then on none of their blocks enters the prefix cache
  (blocks filled after eviction were computed against an evicted context; the prompt blocks
  cached before eviction, kept or freed, hold unchanged, valid contents).

Freeing rule. The worker scores a request in step N (its last prefill chunk) and attends over
the compacted table from step N+1 on. The scheduler frees the evicted blocks when it processes
step N's output. With synchronous scheduling (CPU) no step is in flight then. With async
scheduling step N+1 is in flight but it already skips those blocks (the worker switched at the
end of step N, and a worker runs its steps in order); a freed block can only be handed to
another request by a schedule made after the free, i.e. step N+2 or later. So freeing at
output-processing time is safe in both modes; with pipeline parallelism (several batches in
flight over different stages) it is not proven and eviction should stay off.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.vllm.worker import resolve_request_config

logger = logging.getLogger(__name__)


class SchedulerEvictionState:
    def __init__(self, server_default: Optional[EvictionConfig] = None) -> None:
        self.server_default = server_default or EvictionConfig()
        #: request id -> resolved policy (``None``: left whole).
        self._configs: dict[str, Optional[EvictionConfig]] = {}
        #: requests whose pages were evicted: never cache their blocks again.
        self.frozen: set[str] = set()
        self.blocks_returned = 0
        #: head granularity: request id -> compact blocks taken, not yet in its block list
        #: (:mod:`vllm_kvevict.vllm.head_blocks`).
        self.pending_compactions: dict[str, Any] = {}

    def config_for(self, request: Any) -> Optional[EvictionConfig]:
        """The policy of a scheduler ``Request`` (cached by request id)."""
        req_id = request.request_id
        if req_id not in self._configs:
            sp = getattr(request, "sampling_params", None)
            extra = getattr(sp, "extra_args", None) if sp is not None else None
            self._configs[req_id] = resolve_request_config(extra, self.server_default)
        return self._configs[req_id]

    def known_config(self, req_id: str) -> Optional[EvictionConfig]:
        """The policy :meth:`config_for` resolved for ``req_id`` (``None`` if unknown or whole)."""
        return self._configs.get(req_id)

    def prefix_hit_cap(self, request: Any, block_size: int) -> Optional[int]:
        """Most prompt tokens a prefix-cache hit may cover for this request, or ``None``.

        The policy scores with the queries of the last ``window`` prompt positions, and queries
        are not cached: an evicting request always recomputes at least its window, so the same
        prompt gives the same scores with prefix caching on or off.
        """
        cfg = self.config_for(request)
        if cfg is None:
            return None
        cap = max(0, request.num_prompt_tokens - cfg.window)
        return (cap // block_size) * block_size

    def forget(self, req_ids: Iterable[str]) -> None:
        for req_id in req_ids:
            self.frozen.discard(req_id)

    def finished(self, req_id: str) -> None:
        self.frozen.discard(req_id)
        self._configs.pop(req_id, None)


def evict_blocks(kv_cache_manager: Any, request_id: str, block_indices: Iterable[int]) -> int:
    """Null the request's blocks at ``block_indices`` and free them to the pool.

    Like vLLM's sliding-window ``remove_skipped_blocks``: the entry becomes the null block (the
    list keeps its positional length, so later allocation stays positional) and the block goes
    back to the pool; a block shared through the prefix cache only loses this reference.

    Returns
    -------
    The number of blocks released by this request (references dropped).
    """
    indices = sorted(set(int(i) for i in block_indices), reverse=True)
    released = 0
    for manager in kv_cache_manager.coordinator.single_type_managers:
        blocks = manager.req_to_blocks.get(request_id)
        if not blocks:
            continue
        null = manager._null_block
        freed = []
        for i in indices:
            if 0 <= i < len(blocks) and blocks[i] is not null and not blocks[i].is_null:
                freed.append(blocks[i])
                blocks[i] = null
        if freed:
            manager.block_pool.free_blocks(freed)
            released += len(freed)
    return released


def held_block_count(kv_cache_manager: Any, request_id: str) -> int:
    """Real (non-null) blocks in the request's block list (first KV-cache group)."""
    managers = kv_cache_manager.coordinator.single_type_managers
    blocks = managers[0].req_to_blocks.get(request_id, ()) if managers else ()
    return sum(1 for b in blocks if not b.is_null)


#: Attribute under which the state hangs on vLLM's ``KVCacheManager`` and its coordinator (one
#: state per engine core, even with several in-process engines).
STATE_ATTR = "_kvevict_state"


def attach_state(kv_cache_manager: Any, state: SchedulerEvictionState) -> None:
    setattr(kv_cache_manager, STATE_ATTR, state)
    setattr(kv_cache_manager.coordinator, STATE_ATTR, state)


def state_of(owner: Any) -> Optional[SchedulerEvictionState]:
    """The state attached to a ``KVCacheManager`` or coordinator, ``None`` if eviction is off."""
    return getattr(owner, STATE_ATTR, None)
