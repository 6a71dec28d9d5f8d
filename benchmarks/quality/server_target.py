"""An OpenAI-compatible server (vLLM, with or without the plugin) as a target.

Each task's token ids are sent as the completion prompt (so the server sees exactly the
tokens the other targets see), greedy (``temperature=0``), with the policy in
``extra_body={"vllm_xargs": {"kv_eviction": ..., "kv_budget": ...}}``. The server compresses the
whole prompt (protocol ``prompt``): it cannot tell the question from the context.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

from benchmarks.quality.grid import Point, base_row
from benchmarks.quality.reference_target import HEAD_SELECTION_LABELS


def vllm_xargs(point: Point) -> Optional[dict]:
    """Per-request policy for the plugin; ``None`` (no xargs) for the full cache."""
    if point.is_full_cache:
        return None
    xargs = {"kv_eviction": point.policy, "kv_budget": point.budget, "kv_granularity": point.granularity}
    if point.granularity in HEAD_SELECTION_LABELS:  # head granularity, one way of choosing per head
        xargs.update(kv_granularity="head", kv_head_selection=HEAD_SELECTION_LABELS[point.granularity])
    if point.allocation:
        xargs["kv_allocation"] = point.allocation
    if point.min_tokens is not None:
        xargs["kv_min_tokens"] = point.min_tokens
    return xargs


def run_server(
    tasks,
    points: list[Point],
    writer,
    *,
    base_url: str,
    model: Optional[str],
    engine_name: str,
    concurrency: int,
    progress: Callable[[int], None],
) -> None:
    from openai import OpenAI

    from benchmarks.quality.reference_target import allocation_label
    from vllm_kvevict.evaluation.scoring import score

    client = OpenAI(base_url=base_url, api_key="EMPTY")
    model = model or client.models.list().data[0].id

    def one(task, point: Point, row: dict) -> dict:
        xargs = vllm_xargs(point)
        start = time.perf_counter()
        reply = client.completions.create(
            model=model,
            prompt=task.prompt_ids,
            max_tokens=task.max_new_tokens,
            temperature=0,
            extra_body={"vllm_xargs": xargs} if xargs else None,
        )
        text = reply.choices[0].text
        row.update(score=score(task, text), output=text, answers=task.answers,
                   seconds=round(time.perf_counter() - start, 3), memory_fraction=None)
        return row

    jobs = []
    for task in tasks:
        for point in points:
            row = base_row(engine_name, task, point, "prompt", allocation_label(point))
            if writer.has(row):
                progress(1)
            else:
                jobs.append((task, point, row))
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for row in pool.map(lambda job: one(*job), jobs):
            writer.write(row)
            progress(1)
