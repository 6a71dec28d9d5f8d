"""What a sweep runs: the (policy, allocation, granularity, budget) points and the result rows.

Budget 1.0 keeps everything under every policy, so it is run once per task, as the full-cache
baseline ``policy="none"`` (``allocation``/``granularity`` ``"none"``); every policy's curve
starts from it. A result row (one JSON line) is::

    {"run", "engine", "policy", "allocation", "granularity", "budget", "task", "uid",
     "context_tokens", "prompt_tokens", "protocol", "question_position", "min_tokens",
     "score", "output", "answers", "seconds", "memory_fraction"}

``run`` names the sweep (``--engine-name``: rows of two runs never pool) and ``engine`` what
answered (:data:`ENGINES`): ``reference`` (our reference engine), ``kvpress`` (NVIDIA kvpress),
``server`` (vLLM with the plugin evicting), ``stock`` (vLLM, the request sent with
``kv_eviction: none``). Rows written before ``run`` existed held the run's name in ``engine``;
:func:`read_rows` gives them both fields (:func:`normalized`).

``min_tokens`` is the floor of the fractional budget (``EvictionConfig.min_tokens``; 0 for the
full cache and for rows written before the floor existed, which had none). A VECTOR point's rows
also carry ``"vector": true`` (``policy`` is the base scorer); rows without VECTOR have no
``vector`` key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

DEFAULT_BUDGETS = (1.0, 0.5, 0.2, 0.1, 0.05)
FULL = "none"
#: What answered a row (its ``engine``).
ENGINES = ("reference", "kvpress", "server", "stock")
#: ``run.py --target`` -> the engine of its rows (the server target's full-cache rows: ``stock``).
TARGET_ENGINES = {"reference": "reference", "kvpress": "kvpress", "server": "server"}


@dataclass(frozen=True)
class Point:
    """One policy setting; ``allocation=None`` means the scorer's default, ``min_tokens=None``
    the config's default floor; ``vector``: VECTOR around the scorer."""

    policy: str
    allocation: Optional[str]
    granularity: str
    budget: float
    min_tokens: Optional[int] = None
    vector: bool = False

    @property
    def floor(self) -> int:
        """The floor this point runs with (0 for the full cache)."""
        if self.is_full_cache:
            return 0
        from vllm_kvevict.config import DEFAULT_MIN_TOKENS

        return DEFAULT_MIN_TOKENS if self.min_tokens is None else self.min_tokens

    @property
    def is_full_cache(self) -> bool:
        return self.policy == FULL


FULL_CACHE = Point(FULL, None, FULL, 1.0)


def sweep_points(
    policies: Iterable[str],
    budgets: Iterable[float],
    allocations: Iterable[Optional[str]],
    granularities: Iterable[str],
    floors: Iterable[Optional[int]] = (None,),
    vectors: Iterable[bool] = (False,),
) -> list[Point]:
    """The full-cache point first, then every policy x allocation x granularity x VECTOR off/on x
    budget < 1 x floor (``None``: the config's default). A policy given as ``scorer:allocation``
    runs under that allocation only, whatever ``allocations`` says."""
    points = [FULL_CACHE]
    floors, allocations = list(floors), list(allocations)
    for spec in policies:
        policy, _, pinned = spec.partition(":")
        if policy == FULL:
            continue
        for allocation in [pinned] if pinned else allocations:
            for granularity in granularities:
                points += [Point(policy, allocation, granularity, float(b), floor, vector)
                           for vector in vectors for b in budgets if float(b) < 1.0 for floor in floors]
    return points


def engine_of(label: str, target: Optional[str] = None) -> str:
    """The engine of a row written before rows carried ``run``: its folder's ``meta.json``
    target if known, else from the run's name (``kvpress*``, ``reference*`` / ``lkv-*`` /
    ``vector-*``, ``vllm`` / ``server*``: the server target's default names)."""
    if target in TARGET_ENGINES:
        return TARGET_ENGINES[target]
    for prefix, engine in (("kvpress", "kvpress"), ("reference", "reference"), ("lkv", "reference"),
                           ("vector", "reference"), ("vllm", "server"), ("server", "server")):
        if label.startswith(prefix):
            return engine
    raise ValueError(f"engine of run {label!r}: not one of {', '.join(ENGINES)} and no meta.json target")


def normalized(row: dict, target: Optional[str] = None) -> dict:
    """``row`` with ``run`` and ``engine`` (:data:`ENGINES`); a row written before ``run``
    existed held the run's name in ``engine`` (a server run's full-cache rows then went out with
    no ``vllm_xargs`` to a server with the plugin: ``server``, not ``stock``)."""
    if "run" in row:
        return row
    return dict(row, run=row["engine"], engine=engine_of(row["engine"], target))


def result_key(row: dict) -> tuple:
    """Identity of a result: a resumed run skips rows already written."""
    row = normalized(row)
    return (row["run"], row["uid"], row["policy"], row["allocation"], row["granularity"], float(row["budget"]),
            row["protocol"], int(row.get("min_tokens", 0)), bool(row.get("vector", False)))


def folder_target(folder: Path) -> Optional[str]:
    """The ``--target`` a results folder was made with (its ``meta.json``), if it has one."""
    meta = Path(folder) / "meta.json"
    return json.loads(meta.read_text()).get("target") if meta.is_file() else None


def read_rows(paths: Iterable[Path]) -> Iterator[dict]:
    """Result rows of the ``*.jsonl`` files (or folders of them), :func:`normalized`."""
    for path in paths:
        path = Path(path)
        files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        for file in files:
            target = folder_target(file.parent)
            with open(file) as fh:
                for line in fh:
                    if line.strip():
                        yield normalized(json.loads(line), target)


class ResultWriter:
    """Appends JSON lines to ``path``; knows which results its folder's ``*.jsonl`` already hold
    (so shards writing beside each other, and reruns, skip what is done)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done = {result_key(r) for r in read_rows([self.path.parent])}
        self._fh = open(self.path, "a")

    def has(self, row: dict) -> bool:
        return result_key(row) in self.done

    def write(self, row: dict) -> None:
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        self.done.add(result_key(row))

    def close(self) -> None:
        self._fh.close()


def base_row(run: str, engine: str, task, point: Point, protocol: str, allocation: str) -> dict:
    """The identifying part of a row (no outcome yet); ``engine`` one of :data:`ENGINES`."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    vector = {"vector": True} if point.vector else {}
    return vector | {
        "run": run,
        "engine": engine,
        "policy": point.policy,
        "allocation": allocation,
        "granularity": point.granularity,
        "budget": point.budget,
        "task": task.kind,
        "uid": task.uid,
        "context_tokens": task.context_tokens,
        "prompt_tokens": len(task.prompt_ids),
        "protocol": protocol,
        "question_position": task.question_position,
        "min_tokens": point.floor,
    }
