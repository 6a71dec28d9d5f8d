"""Eviction policies as float32 reference code on plain tensors (no vLLM import).

A policy is built once from the config (:func:`build_policy`): its scorer (``scorers/``, one
small class each, composed like kvpress's presses: ``CriticalKV(base=SnapKV(...))``) maps one
layer to :class:`LayerScores`; allocators (``allocators/``) split a budget across heads (and
layers); :mod:`.select` turns both into kept indices; :mod:`.pages` does the same at block
granularity for the vLLM plugin. Which Ada-KV rule a path uses: ``adakv`` = largest-remainder
rounding of ``(1 - alpha) f[g] + alpha B`` (ours, ALGORITHMS.md); ``adakv_floor`` = kvpress's
safeguard-then-top-k. ``criticalkv`` with ``adakv_floor`` is kvpress's ``CriticalAdaKVPress``.
"""

from __future__ import annotations

from vllm_kvevict.policies import allocators, scorers  # noqa: F401  (fills the registries)
from vllm_kvevict.policies.allocation import Allocation
from vllm_kvevict.policies.allocators.adakv_floor import safe_count
from vllm_kvevict.policies.allocators.global_ import GLOBAL_LAYER_CAP_FACTOR, global_layer_cap
from vllm_kvevict.policies.allocators.pyramid import PYRAMID_BETA, pyramid_layer_budget
from vllm_kvevict.policies.base import AllocatorFn, LayerInputs, LayerScores, Needs, Scorer, ScorerFactory
from vllm_kvevict.policies.head_page_select import pages_per_head, plan_head_pages, run_scores
from vllm_kvevict.policies.pages import evicted_blocks, page_scores, required_blocks, select_pages
from vllm_kvevict.policies.policy import Policy, build_policy, compute_kept
from vllm_kvevict.policies.protection import Protected, window_and_sinks
from vllm_kvevict.policies.ranking import rank
from vllm_kvevict.policies.registry import (
    ALLOCATORS,
    SCORERS,
    build_scorer,
    register_allocator,
    register_scorer,
)
from vllm_kvevict.policies.select import KeptSet, plan_kept, select_kept

__all__ = [
    "ALLOCATORS",
    "Allocation",
    "AllocatorFn",
    "GLOBAL_LAYER_CAP_FACTOR",
    "KeptSet",
    "LayerInputs",
    "LayerScores",
    "Needs",
    "PYRAMID_BETA",
    "Policy",
    "Protected",
    "SCORERS",
    "Scorer",
    "ScorerFactory",
    "build_policy",
    "build_scorer",
    "compute_kept",
    "evicted_blocks",
    "global_layer_cap",
    "page_scores",
    "pages_per_head",
    "plan_head_pages",
    "plan_kept",
    "pyramid_layer_budget",
    "rank",
    "register_allocator",
    "register_scorer",
    "required_blocks",
    "run_scores",
    "safe_count",
    "select_kept",
    "select_pages",
    "window_and_sinks",
]
