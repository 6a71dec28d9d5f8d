"""NVIDIA kvpress (0.5.5) as a target, through :mod:`kvpress_worker` in ``.venv-kvpress``.

Our scorers map to kvpress presses as below (window 32, pooling kernel 5, 4 sinks: our
defaults); a scorer's default ``adakv`` allocation runs as kvpress's ``AdaKVPress`` rule, which
is our ``adakv_floor``. kvpress keeps tokens per head (``granularity="head"``). Scorers with no
kvpress press (h2o, defensivekv, laprox, value_aware) are skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

from benchmarks.quality.grid import Point, base_row

ROOT = Path(__file__).resolve().parents[2]
WINDOW, KERNEL, SINKS, ALPHA, RHO = 32, 5, 4, 0.2, 0.5


def _scorer_press(policy: str, ratio: float) -> Optional[dict]:
    snap = {"class": "SnapKVPress", "compression_ratio": ratio, "window_size": WINDOW, "kernel_size": KERNEL}
    return {
        "snapkv": snap,
        "pyramidkv": {"class": "PyramidKVPress", "compression_ratio": ratio, "window_size": WINDOW, "kernel_size": KERNEL},
        "streamingllm": {"class": "StreamingLLMPress", "compression_ratio": ratio, "n_sink": SINKS},
        "tova": {"class": "TOVAPress", "compression_ratio": ratio},
        "knorm": {"class": "KnormPress", "compression_ratio": ratio},
        "keydiff": {"class": "KeyDiffPress", "compression_ratio": ratio},
        "expected_attention": {"class": "ExpectedAttentionPress", "compression_ratio": ratio, "n_sink": SINKS},
        "criticalkv": snap,  # wrapped below
    }.get(policy)


def press_spec(point: Point) -> tuple[Optional[dict], str]:
    """kvpress press spec of a sweep point and the allocation it really uses.

    Raises ``KeyError`` when kvpress has no such press or allocation.
    """
    if point.is_full_cache:
        return None, "none"
    if point.min_tokens:
        raise KeyError(f"kvpress has no floor (min_tokens={point.min_tokens})")
    from benchmarks.quality.reference_target import point_config

    allocation = point_config(point).resolved_allocation
    inner = _scorer_press(point.policy, 1.0 - point.budget)
    if inner is None:
        raise KeyError(f"kvpress has no press for {point.policy}")
    if point.policy == "pyramidkv":
        return inner, "pyramid"
    adaptive = allocation in ("adakv", "adakv_floor")
    if point.policy == "criticalkv":
        if adaptive:
            return {"class": "CriticalAdaKVPress", "press": inner, "alpha_safeguard": ALPHA, "first_stage_ratio": RHO}, "adakv_floor"
        return {"class": "CriticalKVPress", "press": inner, "first_stage_ratio": RHO}, "uniform"
    if adaptive:
        return {"class": "AdaKVPress", "press": inner, "alpha_safeguard": ALPHA}, "adakv_floor"
    if allocation != "uniform":
        raise KeyError(f"kvpress has no {allocation} allocation for {point.policy}")
    return inner, "uniform"


def kvpress_python() -> str:
    """The kvpress venv's python, made by scripts/setup_kvpress_env.sh (its last output line)."""
    out = subprocess.run(["bash", str(ROOT / "scripts/setup_kvpress_env.sh")], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def run_kvpress(tasks, points: list[Point], writer, *, model_dir, threads: int, progress: Callable[[int], None]) -> None:
    from vllm_kvevict.evaluation.scoring import score

    runs, rows = [], {}
    for point in points:
        try:
            spec, allocation = press_spec(point)
        except KeyError as exc:
            print(f"[kvpress] skipping {point}: {exc}", file=sys.stderr)
            progress(len(tasks))
            continue
        # kvpress keeps int(L * (1 - compression_ratio)) tokens: it has no floor
        point = Point(point.policy, point.allocation, "none" if point.is_full_cache else "head", point.budget, 0)
        runs.append({"id": len(runs), "press": spec, "point": point, "allocation": allocation})
    todo = []
    for task in tasks:
        for run in runs:
            row = base_row("kvpress", "kvpress", task, run["point"], "context", run["allocation"])
            if writer.has(row):
                progress(1)
            else:
                rows[(task.uid, run["id"])] = (task, row)
                todo.append(task)
    if not rows:
        return
    pending_tasks = list({t.uid: t for t in todo}.values())
    spec = {
        "model_dir": str(model_dir),
        "threads": threads,
        "tasks": [{"uid": t.uid, "context_ids": t.context_ids, "question_ids": t.question_ids,
                   "max_new_tokens": t.max_new_tokens, "runs": [r["id"] for r in runs if (t.uid, r["id"]) in rows]}
                  for t in pending_tasks],
        "runs": [{"id": r["id"], "press": r["press"]} for r in runs],
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(spec, fh)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    worker = Path(__file__).with_name("kvpress_worker.py")
    with subprocess.Popen([kvpress_python(), str(worker), fh.name], stdout=subprocess.PIPE, text=True, env=env) as proc:
        for line in proc.stdout:
            result = json.loads(line)
            key = (result["uid"], result["id"])
            if key not in rows:  # already in the results file
                continue
            task, row = rows.pop(key)
            row.update(score=score(task, result["output"]), output=result["output"], answers=task.answers,
                       seconds=result["seconds"], memory_fraction=None)
            writer.write(row)
            progress(1)
    os.unlink(fh.name)
    if proc.returncode:
        raise RuntimeError(f"kvpress worker failed with exit code {proc.returncode}")
