"""One validated eviction policy, whatever door it came through.

The same :class:`EvictionConfig` is built from

* CLI flags (``--kv-eviction=criticalkv --kv-budget=0.1``), which travel to the engine as
  ``additional_config={"kv_eviction": {...}}``;
* ``additional_config`` given directly (``LLM(..., additional_config=...)`` or
  ``--additional-config``), nested form: ``{"kv_eviction": {"scorer": ..., "budget": ...}}``;
* per-request ``vllm_xargs`` (``SamplingParams.extra_args``), flat form:
  ``{"kv_eviction": "snapkv", "kv_budget": 0.2}``.

Every validation failure is raised as :class:`EvictionConfigError`, whose message names the
field (as the user spelled it, e.g. ``kv_budget``), the rejected value and what is allowed.
"""

from vllm_kvevict.config.choices import (
    ADDITIONAL_CONFIG_KEY,
    ALLOCATIONS,
    CRITICALKV_BASES,
    DEFAULT_ALLOCATION,
    DEFAULT_MIN_TOKENS,
    DEFAULT_SINKS,
    FIELD_TO_FLAT,
    FLAT_KEYS,
    FLAT_PREFIX,
    GRANULARITIES,
    HEAD_PAGE_ALLOCATIONS,
    HEAD_PAGE_MAX_BLOCK_SIZE,
    POOLINGS,
    REQUEST_OVERRIDES,
    SCORER_SETTINGS,
    SCORERS,
    SERVER_ONLY,
    WINDOW_SCORERS,
    EvictionConfigError,
    reads_setting,
)
from vllm_kvevict.config.model import EvictionConfig

__all__ = [
    "ADDITIONAL_CONFIG_KEY",
    "ALLOCATIONS",
    "CRITICALKV_BASES",
    "DEFAULT_ALLOCATION",
    "DEFAULT_MIN_TOKENS",
    "DEFAULT_SINKS",
    "FIELD_TO_FLAT",
    "FLAT_KEYS",
    "FLAT_PREFIX",
    "GRANULARITIES",
    "HEAD_PAGE_ALLOCATIONS",
    "HEAD_PAGE_MAX_BLOCK_SIZE",
    "POOLINGS",
    "REQUEST_OVERRIDES",
    "SERVER_ONLY",
    "SCORERS",
    "SCORER_SETTINGS",
    "WINDOW_SCORERS",
    "EvictionConfig",
    "EvictionConfigError",
    "reads_setting",
]
