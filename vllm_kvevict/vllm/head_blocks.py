"""Scheduler side of head granularity: the ``K`` compact blocks of a request, from vLLM's pool.

Timeline of one request (synchronous scheduling; async only shifts each arrow by a step):

1. step N (the prompt's last chunk): the worker scores, selects each (layer, head)'s kept
   tokens, and reports the request as scored;
2. output N: :func:`take_compact_blocks` takes ``K = cache.compact_blocks_needed(...)`` fresh
   blocks (computed from the budget alone) from the pool; the next step's connector metadata
   carries their ids (an *order*); the request's positional blocks are untouched;
3. step N+1: the worker copies every layer's kept K/V into the head-pages of those blocks
   before the layer attends, and attends the compact region + the positional tail from then on;
4. output N+1: :func:`install_compact_blocks` puts the ``K`` blocks in the request's block list
   in place of its first ``P // bs`` positional blocks (the rest of those entries become the
   null block) and frees the positional ones: vLLM frees the compact blocks with the request.

Freeing rule: the positional blocks are freed once the step that compacted them has returned,
and the worker never reads them after that step (it switched to the compact region in it); a
freed block can only be reused by a schedule made after the free. Before step 4 the ``K``
blocks belong to no request in vLLM's eyes: :func:`release_blocks` frees them if the request
finishes, is aborted or preempted first.
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
    #: kept tokens per (layer, KV head), for the metrics.
    kept_per_head: list


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
