"""Name -> function registries for scorers and allocators.

Extension by registration: a new policy is one module that decorates its function with
:func:`register_scorer` / :func:`register_allocator`, plus one import line in
``scorers/__init__.py`` / ``allocators/__init__.py``. Room is left for ``lkv`` (learned scorer
and head budgets) and VECTOR: they register under their own names when they land.
"""

from __future__ import annotations

from typing import Callable, Optional

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.base import AllocatorFn, ScorerFn

#: scorer name -> ``score(inputs, config) -> [Hkv, L]`` float32.
SCORERS: dict[str, ScorerFn] = {}
#: allocator name -> ``allocate(protected_scores, budget, config) -> [num_layers, Hkv]`` int64.
ALLOCATORS: dict[str, AllocatorFn] = {}
#: scorer name -> predicate on the config: True when that scorer already makes the final
#: per-head choice of its layer (it marks every kept token with ``+inf``), so the plan takes
#: head budgets from those marks instead of running the allocator again (two-stage scorers).
PRESELECTING: dict[str, Callable[[EvictionConfig], bool]] = {}
#: scorer name -> token scores for page granularity, for scorers whose own output cannot be
#: pooled into blocks (a two-stage scorer's ``+inf`` marks cover a quarter of the tokens and
#: erase the scores page mode ranks blocks by). Scorers not listed use their own function.
PAGE_SCORERS: dict[str, ScorerFn] = {}


def register_scorer(name: str, preselects: Optional[Callable[[EvictionConfig], bool]] = None):
    """Decorator: ``@register_scorer("snapkv")`` adds the function to :data:`SCORERS`."""

    def wrap(fn: ScorerFn) -> ScorerFn:
        SCORERS[name] = fn
        if preselects is not None:
            PRESELECTING[name] = preselects
        return fn

    return wrap


def register_page_scorer(name: str):
    """Decorator: ``@register_page_scorer("criticalkv")`` adds the function to :data:`PAGE_SCORERS`."""

    def wrap(fn: ScorerFn) -> ScorerFn:
        PAGE_SCORERS[name] = fn
        return fn

    return wrap


def register_allocator(name: str):
    """Decorator: ``@register_allocator("uniform")`` adds the function to :data:`ALLOCATORS`."""

    def wrap(fn: AllocatorFn) -> AllocatorFn:
        ALLOCATORS[name] = fn
        return fn

    return wrap


def preselects(config: EvictionConfig) -> bool:
    """Whether ``config.scorer`` marks its final kept set itself (see :data:`PRESELECTING`)."""
    rule = PRESELECTING.get(config.scorer)
    return bool(rule and rule(config))
