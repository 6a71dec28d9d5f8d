"""The reference engine as a target: one prefill per prompt, then every policy x budget.

Protocol ``context`` (default): the policy compresses ``prompt_ids[:context_end]`` (chat prefix,
instructions, context) and the question is fed after eviction, never evicted. Protocol
``prompt``: the whole prompt is compressed, question included (what a server sees). ``both``:
each prompt's one prefill serves the rows of both.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

from benchmarks.quality.grid import Point, base_row, result_key

#: ``--kvpress-settings``: kvpress 0.5.5's settings where ours differ, as in tests/parity/: windows
#: (ours protect the last 32 tokens for every scorer; kvpress's KnormPress, KeyDiffPress and
#: ExpectedAttentionPress protect none, TOVAPress only the last position) and CriticalKV's
#: stage-2 epsilon (ours 0, the paper's criterion; kvpress and the authors' code 1e-4).
KVPRESS_SETTINGS: dict[str, dict] = {
    "knorm": {"window": 0},
    "keydiff": {"window": 0},
    "expected_attention": {"window": 0},
    "tova": {"window": 1},
    "criticalkv": {"epsilon": 1e-4},
}


#: ``--protocol`` -> the protocols of the rows it writes.
PROTOCOLS = {"context": ("context",), "prompt": ("prompt",), "both": ("context", "prompt")}

#: Granularity labels of a sweep point that fix head granularity's selection: single tokens per
#: head (kvpress's way) or whole pages per head, whatever the block size.
HEAD_SELECTION_LABELS = {"head-token": "token", "head-page": "page"}


def point_config(point: Point, overrides: Optional[dict] = None, vector_share: Optional[float] = None,
                 vector_options: Optional[dict] = None):
    """``EvictionConfig`` of a sweep point (``none`` for the full cache); ``overrides`` maps a
    scorer to extra fields (e.g. :data:`KVPRESS_SETTINGS`); ``vector_share``: VECTOR's ``p_a``
    for VECTOR points (default: the budget's); ``vector_options``: more fields of VECTOR points
    (``vector_residual``, ``vector_min_r2``)."""
    from vllm_kvevict.config import EvictionConfig

    if point.is_full_cache:
        return EvictionConfig()
    extra = dict((overrides or {}).get(point.policy, {}))
    if point.min_tokens is not None:
        extra["min_tokens"] = point.min_tokens
    granularity = point.granularity
    if granularity in HEAD_SELECTION_LABELS:  # head granularity, one way of choosing per head
        granularity, extra["head_selection"] = "head", HEAD_SELECTION_LABELS[point.granularity]
    if point.vector:
        extra["vector"] = "on"
        if vector_share is not None:
            extra["vector_share"] = vector_share
        extra.update(vector_options or {})
    return EvictionConfig.from_fields(
        scorer=point.policy, budget=point.budget, allocation=point.allocation, granularity=granularity, **extra
    )


def allocation_label(point: Point) -> str:
    return "none" if point.is_full_cache else point_config(point).resolved_allocation


def held_blocks(config, gen, compressed_len: int, block_size: int, num_layers: int, num_kv_heads: int) -> int:
    """KV blocks of ``block_size`` the compressed part holds in the served plugin: the full
    cache's, page granularity's kept blocks, or head granularity's ``K`` compact blocks (from the
    budget alone) plus the positional tail block holding the compressed part's last tokens."""
    import math

    from vllm_kvevict.cache.blocks import compact_blocks_needed, prompt_tail_layout

    if not config.enabled or config.keeps_everything:
        return math.ceil(compressed_len / block_size)
    if config.resolved_granularity == "page":
        return int((gen.kept[0][0] // block_size).unique().numel())
    k = compact_blocks_needed(config, compressed_len, block_size, num_layers, num_kv_heads)
    return k + prompt_tail_layout(compressed_len, block_size).tail_blocks(compressed_len)


def run_reference(
    tasks,
    points: list[Point],
    writer,
    *,
    model_dir,
    protocol: str,
    block_size: int,
    progress: Callable[[int], None],
    engine_name: str = "reference",
    overrides: Optional[dict] = None,
    vector_share: Optional[float] = None,
    vector_options: Optional[dict] = None,
    deadline: Optional[float] = None,
) -> None:
    """Run ``points`` on ``tasks`` with :class:`vllm_kvevict.reference.engine.ReferenceEngine`;
    no task is started after ``deadline`` (``time.monotonic()``)."""
    from vllm_kvevict.evaluation.scoring import score
    from vllm_kvevict.reference.engine import ReferenceEngine

    protocols = PROTOCOLS[protocol]
    engine = ReferenceEngine(model_dir)
    for task in tasks:
        pending, keys = [], set()
        for each in protocols:
            for point in points:
                row = base_row(engine_name, "reference", task, point, each, allocation_label(point))
                if writer.has(row) or result_key(row) in keys:  # done, or the same setting twice
                    progress(1)
                else:
                    keys.add(result_key(row))
                    pending.append((each, point, row))
        if not pending:
            continue
        if deadline is not None and time.monotonic() > deadline:
            return
        start, cpu = time.perf_counter(), time.process_time()
        prefilled = engine.prefill(task.prompt_ids)
        prefill_s, prefill_cpu = time.perf_counter() - start, time.process_time() - cpu
        views = {"context": (prefilled.prefix(task.context_end), task.question_ids), "prompt": (prefilled, None)}
        for each, point, row in pending:
            compressed, suffix = views[each]
            start, cpu = time.perf_counter(), time.process_time()
            config = point_config(point, overrides, vector_share, vector_options)
            gen = engine.generate(compressed, config, task.max_new_tokens, suffix_ids=suffix, block_size=block_size)
            row.update(
                score=score(task, gen.text),
                output=gen.text,
                answers=task.answers,
                seconds=round(time.perf_counter() - start, 3),
                cpu_seconds=round(time.process_time() - cpu, 3),
                prefill_seconds=round(prefill_s, 3),
                prefill_cpu_seconds=round(prefill_cpu, 3),
                memory_fraction=round(gen.memory_fraction, 4),
                held_blocks=held_blocks(config, gen, compressed.prompt_len, block_size, compressed.num_layers,
                                        compressed.num_kv_heads),
                block_size=block_size,
            )
            if point.vector:  # the p_a it ran with (rows carry it; it is not part of the result key)
                row["vector_share"] = round(config.vector_share_for(compressed.prompt_len), 4)
                row.update(vector_residual=config.vector_residual, vector_min_r2=config.vector_min_r2)
            writer.write(row)
            progress(1)
