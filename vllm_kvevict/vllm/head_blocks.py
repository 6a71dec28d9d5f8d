"""Scheduler side of head granularity: the ``K`` compact blocks of a request, from vLLM's pool.

Timeline of one request:

1. schedule of step N, the step that completes the prompt: :func:`take_compact_blocks` takes
   ``K = cache.compact_blocks_needed(...)`` fresh blocks (computed from the budget alone, before
   any score exists) from the pool; the step's connector metadata carries their ids (an *order*);
2. step N: the worker scores every layer in the forward, then (after the forward) selects each
   (layer, head)'s kept tokens and copies them into the head-pages of those blocks;
3. output N: :func:`install_compact_blocks` puts the ``K`` blocks in the request's block list in
   place of its first ``P // bs`` positional blocks (the rest of those entries become the null
   block) and frees the positional ones; vLLM frees the compact blocks with the request. From
   step N+1 on the worker attends the compact region + the positional tail.

Freeing rule: the positional blocks are freed once the step that copied them has returned; no
later step reads them (with async scheduling, step N+1 may be in flight: it already attends the
compact region), and a freed block can only be reused by a schedule made after the free.
Between 1 and 3 the ``K`` blocks belong to no request in vLLM's eyes: :func:`release_blocks`
frees them if the request finishes, is aborted or preempted first, or its compaction fails.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

from vllm_kvevict.cache import compact_blocks_needed, prompt_tail_layout
from vllm_kvevict.config import EvictionConfig

logger = logging.getLogger(__name__)


@dataclass
class PendingCompaction:
    """Compact blocks taken for a request, not yet in its block list."""

    blocks: list  # vLLM KVCacheBlock
    first_tail_block: int
    generation: int


def blocks_released_by_compaction(
    config: EvictionConfig, prompt_len: int, block_size: int, num_layers: int, num_kv_heads: int
) -> tuple[int, int]:
    """``(K, released)``: compact blocks needed and positional blocks compaction releases.

    The worker and the scheduler both call it: a request is compacted only when ``K <
    released`` (otherwise it would hold more, and it is left whole on both sides).
    """
    k = compact_blocks_needed(config, prompt_len, block_size, num_layers, num_kv_heads)
    return k, prompt_tail_layout(prompt_len, block_size).first_tail_block


def _single_manager(kv_cache_manager: Any) -> Any:
    managers = kv_cache_manager.coordinator.single_type_managers
    if len(managers) != 1:
        raise RuntimeError(f"head granularity needs one KV-cache group, found {len(managers)}")
    return managers[0]


def take_compact_blocks(kv_cache_manager: Any, request_id: str, num_blocks: int) -> Optional[list]:
    """``num_blocks`` fresh blocks from the pool for a running request, or ``None`` (request not
    running any more, or not enough free blocks: the request is then left whole)."""
    manager = _single_manager(kv_cache_manager)
    if manager.req_to_blocks.get(request_id) is None:
        return None
    pool = manager.block_pool
    if pool.get_num_free_blocks() < num_blocks:
        return None
    return pool.get_new_blocks(num_blocks)


def install_compact_blocks(kv_cache_manager: Any, request_id: str, pending: PendingCompaction) -> Optional[int]:
    """Swap the compact blocks into the request's block list and free its first
    ``first_tail_block`` positional blocks (a block shared through the prefix cache only loses
    this reference, and its cached content stays valid).

    Returns
    -------
    Positional blocks released, or ``None`` if the request no longer holds its blocks (the
    caller then frees the compact blocks with :func:`release_blocks`).
    """
    manager = _single_manager(kv_cache_manager)
    blocks = manager.req_to_blocks.get(request_id)
    first_tail = pending.first_tail_block
    if blocks is None or len(blocks) < first_tail:
        return None
    null = manager._null_block
    old = [b for b in blocks[:first_tail] if b is not null and not b.is_null]
    for i in range(first_tail):
        blocks[i] = pending.blocks[i] if i < len(pending.blocks) else null
    manager.block_pool.free_blocks(old)
    return len(old)


def release_blocks(kv_cache_manager: Any, blocks: list) -> None:
    """Give compact blocks that never reached a block list back to the pool."""
    if blocks:
        _single_manager(kv_cache_manager).block_pool.free_blocks(blocks)
