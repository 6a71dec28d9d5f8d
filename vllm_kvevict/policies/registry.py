"""Name -> factory registries for scorers and allocators, and the scorer a config builds.

Extension by registration: a new scorer is one module with its class and a factory from the
config decorated with :func:`register_scorer`, plus one import line in ``scorers/__init__.py``
(allocators likewise, :func:`register_allocator`). A scorer that reads the model it runs on
(``lkv``: its trained artifact) registers with ``reads_model=True``; its factory then also
receives the model (a :class:`~vllm_kvevict.lkv.identity.ModelIdentity`, or a callable giving
it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.base import AllocatorFn, LayerInputs, LayerScores, Scorer, ScorerFactory
from vllm_kvevict.policies.protection import Protected

#: scorer name -> ``factory(config) -> Scorer`` (window and sinks not yet protected).
SCORERS: dict[str, ScorerFactory] = {}
#: allocator name -> ``allocate(scores, budget, config) -> [num_layers, Hkv]`` int64.
ALLOCATORS: dict[str, AllocatorFn] = {}
#: scorers whose factory is ``factory(config, model)``.
MODEL_SCORERS: set[str] = set()


def register_scorer(name: str, reads_model: bool = False):
    """Decorator: ``@register_scorer("snapkv")`` adds the factory to :data:`SCORERS`;
    ``reads_model=True``: the factory is called as ``factory(config, model)``."""

    def wrap(factory: ScorerFactory) -> ScorerFactory:
        SCORERS[name] = factory
        if reads_model:
            MODEL_SCORERS.add(name)
        return factory

    return wrap


def register_allocator(name: str):
    """Decorator: ``@register_allocator("uniform")`` adds the function to :data:`ALLOCATORS`."""

    def wrap(fn: AllocatorFn) -> AllocatorFn:
        ALLOCATORS[name] = fn
        return fn

    return wrap


@dataclass(frozen=True)
class Unscored(Scorer):
    """Scorer ``none``: zeros, nothing protected (the plan keeps everything)."""

    def score(self, inputs: LayerInputs) -> LayerScores:
        return LayerScores.unprotected(torch.zeros(inputs.num_kv_heads, inputs.seq_len))


def build_scorer(config: EvictionConfig, name: Optional[str] = None, model: Any = None) -> Scorer:
    """The scorer ``name`` (default ``config.scorer``) built from ``config``, with the config's
    window and sinks protected; :class:`Unscored` for ``none``. ``model`` (the model's identity,
    or a callable giving it) reaches the scorers that read it; the others ignore it."""
    name = name or config.scorer
    if name == "none":
        return Unscored()
    scorer = SCORERS[name](config, model) if name in MODEL_SCORERS else SCORERS[name](config)
    return Protected(scorer, window=config.window, sinks=config.resolved_sinks)
