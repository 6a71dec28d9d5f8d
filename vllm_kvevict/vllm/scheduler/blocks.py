"""Blocks leaving and entering a request's block list, through vLLM's own pool.

Freeing rule. The worker scores a request in step N (its last prefill chunk) and from step N+1
on attends without the evicted (page) or positional prompt (head) blocks. The scheduler frees
them when it processes step N's output. With synchronous scheduling (CPU) no step is in flight
then; with async scheduling step N+1 is in flight but already skips them (the worker switched
at the end of step N, and a worker runs its steps in order); a freed block can only be handed
to another request by a schedule made after the free. Pipeline parallelism (several batches in
flight) is refused at startup.

All access to vLLM's block lists goes through the compat module's helpers (``block_list``,
``null_block``, ``take_new_blocks``, ``free_blocks``), which name the vLLM attributes they use.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from vllm_kvevict.cache import compact_blocks_needed, prompt_tail_layout
from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.vllm.compat import active
from vllm_kvevict.vllm.scheduler.state import PendingCompaction


def evict_blocks(kv_cache_manager: Any, request_id: str, block_indices: Iterable[int]) -> int:
    """Null the request's blocks at ``block_indices`` and free them to the pool.

    Like vLLM's sliding-window ``remove_skipped_blocks``: the entry becomes the null block (the
    list keeps its positional length, so later allocation stays positional) and the block goes
    back to the pool; a block shared through the prefix cache only loses this reference.

    Returns
    -------
    The number of blocks released by this request (references dropped).
    """
    vllm = active()
    indices = sorted(set(int(i) for i in block_indices), reverse=True)
    manager = vllm.single_manager(kv_cache_manager)
    blocks = vllm.block_list(manager, request_id)
    if not blocks:
        return 0
    null = vllm.null_block(manager)
    freed = []
    for i in indices:
        if 0 <= i < len(blocks) and blocks[i] is not null and not blocks[i].is_null:
            freed.append(blocks[i])
            blocks[i] = null
    vllm.free_blocks(manager, freed)
    return len(freed)


def held_block_count(kv_cache_manager: Any, request_id: str) -> int:
    """Real (non-null) blocks in the request's block list."""
    vllm = active()
    blocks = vllm.block_list(vllm.single_manager(kv_cache_manager), request_id) or ()
    return sum(1 for b in blocks if not b.is_null)


def blocks_released_by_compaction(config: EvictionConfig, prompt_len: int, block_size: int, num_layers: int,
                                  num_kv_heads: int) -> tuple[int, int]:
    """``(K, released)``: compact blocks needed and positional blocks compaction releases (a
    request is compacted only when ``K < released``)."""
    k = compact_blocks_needed(config, prompt_len, block_size, num_layers, num_kv_heads)
    return k, prompt_tail_layout(prompt_len, block_size).first_tail_block


def take_compact_blocks(kv_cache_manager: Any, request_id: str, num_blocks: int) -> Optional[list]:
    """``num_blocks`` fresh blocks for a running request, or ``None`` (not running any more, or
    not enough free blocks: the request is then left whole)."""
    vllm = active()
    manager = vllm.single_manager(kv_cache_manager)
    if vllm.block_list(manager, request_id) is None:
        return None
    return vllm.take_new_blocks(manager, num_blocks)


def install_compact_blocks(kv_cache_manager: Any, request_id: str, pending: PendingCompaction) -> Optional[int]:
    """Swap the compact blocks into the request's block list and free its first
    ``first_tail_block`` positional blocks (a block shared through the prefix cache only loses
    this reference, and its cached content stays valid).

    Returns
    -------
    Positional blocks released, or ``None`` if the request no longer holds its blocks (the
    caller then frees the compact blocks with :func:`release_blocks`).
    """
    vllm = active()
    manager = vllm.single_manager(kv_cache_manager)
    blocks = vllm.block_list(manager, request_id)
    first_tail = pending.first_tail_block
    if blocks is None or len(blocks) < first_tail:
        return None
    null = vllm.null_block(manager)
    old = [b for b in blocks[:first_tail] if b is not null and not b.is_null]
    for i in range(first_tail):
        blocks[i] = pending.blocks[i] if i < len(pending.blocks) else null
    vllm.free_blocks(manager, old)
    return len(old)


def release_blocks(kv_cache_manager: Any, blocks: list) -> None:
    """Give compact blocks that never reached a block list back to the pool."""
    if blocks:
        vllm = active()
        vllm.free_blocks(vllm.single_manager(kv_cache_manager), blocks)
