"""What a sweep runs: the (policy, allocation, granularity, budget) points and the result rows.

Budget 1.0 keeps everything under every policy, so it is run once per task, as the full-cache
baseline ``policy="none"`` (``allocation``/``granularity`` ``"none"``); every policy's curve
starts from it. A result row (one JSON line) is::

    {"engine", "policy", "allocation", "granularity", "budget", "task", "uid",
     "context_tokens", "prompt_tokens", "protocol", "question_position", "min_tokens",
     "score", "output", "answers", "seconds", "memory_fraction"}

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
    budget < 1 x floor (``None``: the config's default)."""
    points = [FULL_CACHE]
    floors = list(floors)
    for policy in policies:
        if policy == FULL:
            continue
        for allocation in allocations:
            for granularity in granularities:
                points += [Point(policy, allocation, granularity, float(b), floor, vector)
                           for vector in vectors for b in budgets if float(b) < 1.0 for floor in floors]
    return points


def result_key(row: dict) -> tuple:
    """Identity of a result: a resumed run skips rows already written."""
    return (row["engine"], row["uid"], row["policy"], row["allocation"], row["granularity"], float(row["budget"]),
            row["protocol"], int(row.get("min_tokens", 0)), bool(row.get("vector", False)))


def read_rows(paths: Iterable[Path]) -> Iterator[dict]:
    for path in paths:
        path = Path(path)
        files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        for file in files:
            with open(file) as fh:
                for line in fh:
                    if line.strip():
                        yield json.loads(line)


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


def base_row(engine: str, task, point: Point, protocol: str, allocation: str) -> dict:
    """The identifying part of a row (no outcome yet)."""
    vector = {"vector": True} if point.vector else {}
    return vector | {
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
