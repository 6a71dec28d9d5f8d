"""An offline vLLM engine whose engine core runs in this process, for tests and benchmarks.

With ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` the engine core (scheduler, KV-cache manager, block
pool) and, on CPU, the worker live in the caller's process, so vLLM's own counters can be read
directly (:func:`block_pool`, :func:`held_blocks`). One such engine at a time per process:
:func:`open_llm` shuts it down and cleans vLLM's distributed state on exit.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
from typing import Any, Iterator, Mapping, Optional


@contextlib.contextmanager
def open_llm(model: str, **kwargs: Any) -> Iterator[Any]:
    """``vllm.LLM(model, **kwargs)`` with an in-process engine core; shut down on exit.

    Defaults suited to this CPU: float32, eager, block size 32, 64 MiB of KV cache.
    """
    previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    options = dict(dtype="float32", enforce_eager=True, block_size=32, kv_cache_memory_bytes=64 << 20)
    options.update(kwargs)
    llm = LLM(model, **options)
    try:
        yield llm
    finally:
        try:
            llm.llm_engine.engine_core.shutdown()
        finally:
            del llm
            gc.collect()
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
            if previous is None:
                os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
            else:
                os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = previous


def engine_core(llm: Any) -> Any:
    """The in-process ``EngineCore`` of ``llm`` (its ``scheduler`` holds the KV-cache manager)."""
    return llm.llm_engine.engine_core.engine_core


def scheduler(llm: Any) -> Any:
    return engine_core(llm).scheduler


def block_pool(llm: Any) -> Any:
    """vLLM's ``BlockPool`` (``get_num_free_blocks()``)."""
    return scheduler(llm).kv_cache_manager.block_pool


def held_blocks(llm: Any, request_id: str) -> int:
    """Real (non-null) blocks in the request's block list, per vLLM's KV-cache manager."""
    from vllm_kvevict.vllm.scheduler.blocks import held_block_count

    return held_block_count(scheduler(llm).kv_cache_manager, request_id)


def scheduler_side(llm: Any) -> Any:
    """The scheduler half of our KV connector (``None`` when eviction is off)."""
    connector = scheduler(llm).connector
    return getattr(connector, "scheduler_side", None)


def worker_side(llm: Any) -> Any:
    """The worker half of our KV connector in this process (CPU: the worker runs in-process)."""
    from vllm_kvevict.vllm.step import step_source

    return step_source()


def record_evictions(llm: Any) -> Any:
    """Start recording what the worker evicts (scores, evicted blocks, kept sets, failures);
    returns the :class:`~vllm_kvevict.vllm.worker.side.EvictionRecorder`."""
    from vllm_kvevict.vllm.worker.side import EvictionRecorder

    side = worker_side(llm)
    if side.recorder is None:
        side.recorder = EvictionRecorder()
    return side.recorder


def recorded_key(records: Mapping[str, Any], request_id: str) -> Optional[str]:
    """The key of ``request_id``'s latest entry in one of the recorder's maps (``recorder.kept``,
    ``.evicted``, ...): the engine core may know it as ``<id>-<suffix>``, and a request that ran
    again (preemption) is recorded again; ``None`` if it has none."""
    keys = [k for k in records if k == request_id or k.startswith(f"{request_id}-")]
    return keys[-1] if keys else None


@contextlib.contextmanager
def collected_stats(llm: Any) -> Iterator[Any]:
    """The scheduler side's eviction stats of the steps run inside the block, summed into the
    yielded ``EvictionStats`` (the engine drains them every step, so each drained batch is kept)."""
    from vllm_kvevict.vllm.metrics.stats import EvictionStats

    stats = scheduler_side(llm).stats
    stats.take()
    total, take = EvictionStats(), stats.take

    def keep() -> Any:
        got = take()
        if got is not None:
            total.aggregate(got)
        return got

    stats.take = keep
    try:
        yield total
    finally:
        keep()
        del stats.take


@contextlib.contextmanager
def key_only_reads() -> Iterator[list[tuple[str, int, int]]]:
    """Record VECTOR's key-only tokens as decode attention takes them, while the block runs:
    ``(path, layer, tokens)`` per take, into the yielded list.

    ``gpu``: a layer's :class:`~vllm_kvevict.kernels.key_only_decode.KeyOnlySegment` made for one
    call of the GPU head-row decode (``decode_head_rows``: CUDA, and vLLM-CPU under
    ``KVEVICT_CPU_HEAD_DECODE=paged``), recorded once the kernel call it was passed to returned;
    ``tokens`` the key-only tokens of every row of that call. ``torch``: one row's key-only values
    rebuilt by the torch path (``head_rows.read_region_entries``). The engine must run in this
    process (:func:`open_llm`); the functions are wrapped for the block only.
    """
    from vllm_kvevict.vllm.backends import head_batch, head_rows

    reads: list[tuple[str, int, int]] = []
    made: dict[int, tuple[Any, int, int]] = {}  # id(segment) -> (segment, layer, tokens), until its call returns
    segment, attention, values = head_batch.KeyOnlyWeights.segment, head_batch.paged_decode_attention, \
        head_rows.entry_values

    def counted_segment(self, layer, lens, positions):
        made_segment = segment(self, layer, lens, positions)
        made[id(made_segment)] = (made_segment, int(layer), int(lens.sum()))
        return made_segment

    def counted_attention(*args, key_only=None, **kwargs):
        out = attention(*args, key_only=key_only, **kwargs)
        if key_only is not None:
            _, layer, tokens = made.pop(id(key_only), (None, -1, int(key_only.lens.sum())))
            reads.append(("gpu", layer, tokens))
        return out

    def counted_values(artifact, layer, keys, heads, positions):
        out = values(artifact, layer, keys, heads, positions)
        reads.append(("torch", int(layer), int(keys.shape[0])))
        return out

    head_batch.KeyOnlyWeights.segment, head_batch.paged_decode_attention = counted_segment, counted_attention
    head_rows.entry_values = counted_values
    try:
        yield reads
    finally:
        head_batch.KeyOnlyWeights.segment, head_batch.paged_decode_attention = segment, attention
        head_rows.entry_values = values


def run_until_done(llm: Any, watched: str) -> tuple[int, dict[str, int]]:
    """Step the engine until every request finished: ``(the most preemptions request
    ``watched`` went through, {request id: generated tokens} of the finished ones)``."""
    engine, sched = llm.llm_engine, scheduler(llm)
    preemptions, finished = 0, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = len(out.outputs[0].token_ids)
        req = sched.requests.get(watched)
        if req is not None:
            preemptions = max(preemptions, req.num_preemptions)
    return preemptions, finished


def random_prompt(num_tokens: int, seed: int, low: int = 100, high: int = 20000) -> list[int]:
    """A reproducible prompt of random token ids."""
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(num_tokens)]
