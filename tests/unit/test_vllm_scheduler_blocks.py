"""Scheduler side on vLLM's real KV-cache manager and block pool (no engine, no model): blocks
leave block lists and return to the pool, compact blocks swap in, the prefix-cache hooks."""

from __future__ import annotations

import pytest
import torch

from vllm_kvevict.vllm.scheduler.blocks import (
    evict_blocks,
    held_block_count,
    install_compact_blocks,
    release_blocks,
    take_compact_blocks,
)
from vllm_kvevict.vllm.scheduler.state import PendingCompaction, SchedulerEvictionState, attach_state, state_of

BLOCK = 16


@pytest.fixture()
def kv_manager():
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.kv_cache_utils import init_none_hash
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    from vllm_kvevict.vllm.compat import active

    active().install_all()  # the prefix-cache patches under test
    init_none_hash(sha256)
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=32, dtype=torch.float32)
    config = KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["l0"], spec)])
    return KVCacheManager(config, max_model_len=1024, scheduler_block_size=BLOCK, hash_block_size=BLOCK)


def _request(req_id: str, tokens: list[int], **extra):
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher
    from vllm.v1.request import Request

    sp = SamplingParams(max_tokens=8, extra_args=extra or None)
    return Request(req_id, tokens, sp, None, block_hasher=get_request_block_hasher(BLOCK, sha256))


def _admit(manager, request):
    blocks, hit, _ = manager.get_computed_blocks(request)
    assert manager.allocate_slots(request, request.num_tokens - hit, hit, blocks) is not None
    request.num_computed_tokens = request.num_tokens
    return hit


def test_evicted_blocks_become_null_and_return_to_pool(kv_manager):
    free0 = kv_manager.block_pool.get_num_free_blocks()
    req = _request("a", list(range(100)))  # 7 blocks, the last partial
    _admit(kv_manager, req)
    assert kv_manager.block_pool.get_num_free_blocks() == free0 - 7
    released = evict_blocks(kv_manager, "a", [1, 2, 4, 4])
    assert released == 3
    assert kv_manager.block_pool.get_num_free_blocks() == free0 - 4
    row = kv_manager.coordinator.single_type_managers[0].req_to_blocks["a"]
    assert [b.is_null for b in row] == [False, True, True, False, True, False, False]
    assert evict_blocks(kv_manager, "a", [1, 2]) == 0  # already null: nothing freed twice
    kv_manager.free(req)
    assert kv_manager.block_pool.get_num_free_blocks() == free0


def test_shared_prefix_block_stays_with_its_other_owner(kv_manager):
    free0 = kv_manager.block_pool.get_num_free_blocks()
    prompt = list(range(100))
    a, b = _request("a", prompt), _request("b", prompt[:64] + [7] * 36)
    _admit(kv_manager, a)
    assert _admit(kv_manager, b) == 64  # shares a's first 4 blocks
    held = free0 - kv_manager.block_pool.get_num_free_blocks()
    assert evict_blocks(kv_manager, "a", [0, 1, 5]) == 3
    # blocks 0 and 1 are still b's: only block 5 went back to the pool.
    assert free0 - kv_manager.block_pool.get_num_free_blocks() == held - 1
    kv_manager.free(a)
    kv_manager.free(b)
    assert kv_manager.block_pool.get_num_free_blocks() == free0


def test_frozen_request_adds_nothing_to_prefix_cache(kv_manager):
    state = SchedulerEvictionState()
    attach_state(kv_manager, state)
    assert state_of(kv_manager) is state and state_of(kv_manager.coordinator) is state
    req = _request("a", list(range(40)))  # 2 full blocks + 8 tokens
    _admit(kv_manager, req)
    single = kv_manager.coordinator.single_type_managers[0]
    assert single.num_cached_block["a"] == 2
    state.frozen.add("a")
    req.append_output_token_ids(list(range(1000, 1030)))  # decode fills block 2 and 3
    assert kv_manager.allocate_slots(req, 30, req.num_computed_tokens) is not None
    req.num_computed_tokens = req.num_tokens
    kv_manager.cache_blocks(req, req.num_tokens)
    assert single.num_cached_block["a"] == 2
    state.frozen.discard("a")
    kv_manager.cache_blocks(req, req.num_tokens)
    assert single.num_cached_block["a"] == 4  # control: unfrozen, they would be cached
    kv_manager.free(req)


def test_prefix_hit_of_evicting_request_stops_before_its_window(kv_manager):
    from vllm_kvevict.config import EvictionConfig

    prompt = list(range(200))
    first = _request("a", prompt)
    _admit(kv_manager, first)
    kv_manager.free(first)
    # No eviction configured: vLLM's own hit (all full blocks, last token recomputed).
    assert kv_manager.get_computed_blocks(_request("b", prompt))[1] == 192
    attach_state(kv_manager, SchedulerEvictionState(EvictionConfig(scorer="snapkv", budget=0.2, window=32)))
    blocks, hit, _ = kv_manager.get_computed_blocks(_request("c", prompt))
    assert hit == (200 - 32) // BLOCK * BLOCK == 160
    assert len(blocks.get_block_ids()[0]) == hit // BLOCK
    # A request that opts out keeps vLLM's full hit.
    assert kv_manager.get_computed_blocks(_request("d", prompt, kv_eviction="none"))[1] == 192


def test_compact_blocks_swap_in_for_the_positional_prompt_blocks(kv_manager):
    free0 = kv_manager.block_pool.get_num_free_blocks()
    req = _request("a", list(range(100)))  # 7 blocks: 6 full prompt blocks + the tail's
    _admit(kv_manager, req)
    compact = take_compact_blocks(kv_manager, "a", 2)
    assert len(compact) == 2 and kv_manager.block_pool.get_num_free_blocks() == free0 - 9
    released = install_compact_blocks(kv_manager, "a", PendingCompaction(compact, first_tail_block=6, generation=1))
    assert released == 6 and held_block_count(kv_manager, "a") == 3  # 2 compact + the tail block
    row = kv_manager.coordinator.single_type_managers[0].req_to_blocks["a"]
    assert row[:2] == compact and all(b.is_null for b in row[2:6]) and not row[6].is_null
    kv_manager.free(req)
    assert kv_manager.block_pool.get_num_free_blocks() == free0


def test_compact_blocks_of_a_request_gone_are_refused_or_given_back(kv_manager):
    free0 = kv_manager.block_pool.get_num_free_blocks()
    assert take_compact_blocks(kv_manager, "nobody", 2) is None
    assert take_compact_blocks(kv_manager, "nobody", free0 + 1) is None
    req = _request("a", list(range(40)))
    _admit(kv_manager, req)
    assert take_compact_blocks(kv_manager, "a", free0) is None  # the pool is short: left whole
    compact = take_compact_blocks(kv_manager, "a", 2)
    kv_manager.free(req)
    assert install_compact_blocks(kv_manager, "a", PendingCompaction(compact, 2, 1)) is None
    release_blocks(kv_manager, compact)
    assert kv_manager.block_pool.get_num_free_blocks() == free0
