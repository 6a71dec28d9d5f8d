"""An OpenAI-compatible server (vLLM, with or without the plugin) as a target.

Each task's token ids are sent as the completion prompt (so the server sees exactly the
tokens the other targets see), greedy (``temperature=0``), with the policy in
``extra_body={"vllm_xargs": {"kv_eviction": ..., "kv_budget": ...}}``. The server compresses the
whole prompt (protocol ``prompt``): it cannot tell the question from the context. The full-cache
point goes out as ``{"kv_eviction": "none"}``: the request is left to stock vLLM (rows
``engine="stock"``; on a server started with a policy the plugin leaves such a request whole,
token-identical to vLLM without it); every other point is the plugin's (``engine="server"``).

Prefix caching (vLLM's default) would let a setting reuse the prompt blocks an earlier setting
prefilled: the KV is the same, but then the comparison would not be one of what each setting
does from a cold start. ``cache_salt="setting"`` (the default) salts vLLM's prefix cache per
setting and prompt (``cache_salt`` of the request), so every setting prefills every prompt itself; rows
record ``cached_tokens`` (``usage.prompt_tokens_details``, with ``--enable-prompt-tokens-details``;
``None`` without it), which shows it.
"""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

from benchmarks.quality.grid import Point, base_row
from benchmarks.quality.reference_target import HEAD_SELECTION_LABELS

#: ``cache_salt`` choices: one salt per setting (each prefills on its own), or none (shared cache).
CACHE_SALTS = ("setting", "none")


def vllm_xargs(point: Point) -> dict:
    """Per-request policy for the plugin; ``kv_eviction: none`` (stock vLLM) for the full cache."""
    if point.is_full_cache:
        return {"kv_eviction": "none"}
    xargs = {"kv_eviction": point.policy, "kv_budget": point.budget, "kv_granularity": point.granularity}
    if point.granularity in HEAD_SELECTION_LABELS:  # head granularity, one way of choosing per head
        xargs.update(kv_granularity="head", kv_head_selection=HEAD_SELECTION_LABELS[point.granularity])
    if point.allocation:
        xargs["kv_allocation"] = point.allocation
    if point.min_tokens is not None:
        xargs["kv_min_tokens"] = point.min_tokens
    return xargs


def engine_of_point(point: Point) -> str:
    return "stock" if point.is_full_cache else "server"


def cache_salt(run: str, point: Point, uid: str, mode: str = "setting") -> Optional[str]:
    """The request's ``cache_salt``: one per (run, setting, prompt) under ``"setting"`` (prompts of
    one kind share their first block, chat prefix and header, so a salt per setting alone still
    lets them hit each other there), none under ``"none"``. vLLM allows at most 128 characters."""
    if mode not in CACHE_SALTS:
        raise ValueError(f"cache_salt must be one of {', '.join(CACHE_SALTS)}, got {mode!r}")
    if mode == "none":
        return None
    label = "|".join(str(x) for x in (run, uid, point.policy, point.allocation, point.granularity, point.budget,
                                       point.min_tokens, point.vector))
    return "kvevict-" + hashlib.sha256(label.encode()).hexdigest()[:40]


def cached_tokens(usage) -> Optional[int]:
    """``usage.prompt_tokens_details.cached_tokens`` (``None`` if the server does not report it)."""
    details = getattr(usage, "prompt_tokens_details", None) if usage is not None else None
    value = getattr(details, "cached_tokens", None) if details is not None else None
    return None if value is None else int(value)


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
    salt: str = "setting",
    deadline: Optional[float] = None,
) -> int:
    """Send every (task, point) not yet in ``writer``; return how many were left unsent because
    ``deadline`` (``time.monotonic()``) passed (a rerun resumes them)."""
    from openai import OpenAI

    from benchmarks.quality.reference_target import allocation_label
    from vllm_kvevict.evaluation.scoring import score

    client = OpenAI(base_url=base_url, api_key="EMPTY", timeout=600)
    model = model or client.models.list().data[0].id

    def one(task, point: Point, row: dict) -> Optional[dict]:
        if deadline is not None and time.monotonic() > deadline:
            return None
        extra = {"vllm_xargs": vllm_xargs(point)}
        if (value := cache_salt(engine_name, point, task.uid, salt)) is not None:
            extra["cache_salt"] = value
        start = time.perf_counter()
        reply = client.completions.create(model=model, prompt=task.prompt_ids, max_tokens=task.max_new_tokens,
                                          temperature=0, extra_body=extra)
        text = reply.choices[0].text
        row.update(score=score(task, text), output=text, answers=task.answers,
                   seconds=round(time.perf_counter() - start, 3), memory_fraction=None,
                   cached_tokens=cached_tokens(reply.usage), cache_salt=extra.get("cache_salt"))
        return row

    jobs = []
    for task in tasks:
        for point in points:
            row = base_row(engine_name, engine_of_point(point), task, point, "prompt", allocation_label(point))
            if writer.has(row):
                progress(1)
            else:
                jobs.append((task, point, row))
    left = 0
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for row in pool.map(lambda job: one(*job), jobs):
            if row is None:
                left += 1
                continue
            writer.write(row)
            progress(1)
    return left
