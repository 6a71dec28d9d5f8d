"""Eviction policies as float32 reference functions on plain tensors (no vLLM import).

Scorers (``scorers/``, one module each) map one layer to token scores ``[Hkv, L]``; allocators
(``allocators/``) split a budget across heads (and layers); :mod:`.select` turns both into kept
indices; :mod:`.pages` does the same at block granularity for the vLLM plugin. Which Ada-KV rule
a path uses: ``adakv`` = largest-remainder rounding of ``(1 - alpha) f[g] + alpha B`` (ours,
ALGORITHMS.md); ``adakv_floor`` = kvpress's safeguard-then-top-k. ``criticalkv`` with
``adakv_floor`` is kvpress's ``CriticalAdaKVPress``.
"""

from __future__ import annotations

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies import allocators, scorers  # noqa: F401  (fills the registries)
from vllm_kvevict.policies.allocators.adakv_floor import safe_count
from vllm_kvevict.policies.allocators.global_ import GLOBAL_LAYER_CAP_FACTOR, global_layer_cap
from vllm_kvevict.policies.allocators.pyramid import PYRAMID_BETA, pyramid_layer_budget
from vllm_kvevict.policies.base import AllocatorFn, LayerInputs, ScorerFn
from vllm_kvevict.policies.head_page_select import plan_head_pages
from vllm_kvevict.policies.pages import page_scores, required_blocks, select_pages
from vllm_kvevict.policies.registry import (
    ALLOCATORS,
    PAGE_SCORERS,
    PRESELECTING,
    SCORERS,
    preselects,
    register_allocator,
    register_page_scorer,
    register_scorer,
)
from vllm_kvevict.policies.select import KeptSet, plan_kept, protect, select_kept


def score_layer(inputs: LayerInputs, config: EvictionConfig) -> torch.Tensor:
    """``[Hkv, L]`` float32 scores of one layer under ``config.scorer`` (zeros for ``none``)."""
    if not config.enabled:
        return torch.zeros(inputs.num_kv_heads, inputs.seq_len)
    return SCORERS[config.scorer](inputs, config).float()


def page_score_layer(inputs: LayerInputs, config: EvictionConfig) -> torch.Tensor:
    """``[Hkv, L]`` float32 token scores to pool into page scores (:func:`page_scores`).

    The scorer's page variant (:data:`PAGE_SCORERS`) when it has one, else :func:`score_layer`.
    """
    page = PAGE_SCORERS.get(config.scorer) if config.enabled else None
    return page(inputs, config).float() if page is not None else score_layer(inputs, config)


def head_score_layer(inputs: LayerInputs, config: EvictionConfig, block_size: int) -> torch.Tensor:
    """``[Hkv, L]`` token scores for head granularity: pooled into page scores when each head
    keeps whole pages (:func:`page_score_layer`), the scorer's own otherwise (:func:`score_layer`)."""
    if config.head_selection_for(block_size) == "page":
        return page_score_layer(inputs, config)
    return score_layer(inputs, config)


def plan_head(scores: list[torch.Tensor], config: EvictionConfig, seq_len: int, block_size: int) -> KeptSet:
    """Head granularity's kept set from :func:`head_score_layer` scores: whole block-aligned pages
    per head (:func:`plan_head_pages`) or single tokens (:func:`plan_kept`)."""
    if config.head_selection_for(block_size) == "page":
        return plan_head_pages(scores, config, seq_len, block_size)
    return plan_kept(scores, config, seq_len)


def compute_kept(layers: list[LayerInputs], config: EvictionConfig) -> KeptSet:
    """Score every layer, then :func:`plan_kept` (allocation + selection)."""
    scores = [score_layer(layer, config) for layer in layers]
    return plan_kept(scores, config, layers[0].seq_len)


__all__ = [
    "ALLOCATORS",
    "AllocatorFn",
    "GLOBAL_LAYER_CAP_FACTOR",
    "KeptSet",
    "LayerInputs",
    "PAGE_SCORERS",
    "PRESELECTING",
    "PYRAMID_BETA",
    "SCORERS",
    "ScorerFn",
    "compute_kept",
    "global_layer_cap",
    "head_score_layer",
    "page_score_layer",
    "plan_head",
    "plan_head_pages",
    "page_scores",
    "plan_kept",
    "preselects",
    "protect",
    "pyramid_layer_budget",
    "register_allocator",
    "register_page_scorer",
    "register_scorer",
    "required_blocks",
    "safe_count",
    "score_layer",
    "select_kept",
    "select_pages",
]
