"""The allowed values of every policy setting, their defaults, and which policies read which."""

from __future__ import annotations

from typing import Any, Mapping

#: Scorers of ALGORITHMS.md ("none" disables eviction); ``lkv`` reads a trained artifact.
SCORERS: tuple[str, ...] = (
    "none",
    "streamingllm",
    "snapkv",
    "pyramidkv",
    "tova",
    "h2o",
    "knorm",
    "keydiff",
    "expected_attention",
    "criticalkv",
    "defensivekv",
    "laprox",
    "value_aware",
    "lkv",
)
#: Allocators: ``adakv`` uses largest-remainder rounding, ``adakv_floor`` is kvpress's rule
#: (each head first gets its top ``alpha * B``, then a layer-wide top-k of the rest); ``lkv``
#: splits each layer by learned head shares (a trained artifact).
ALLOCATIONS: tuple[str, ...] = ("uniform", "adakv", "adakv_floor", "pyramid", "global", "lkv")
#: Scorers CriticalKV can wrap: one-stage scorers whose score is a token's worth, not a choice
#: (not the two-stage criticalkv/defensivekv, nor laprox/value_aware, already value-weighted).
CRITICALKV_BASES: tuple[str, ...] = (
    "snapkv",
    "pyramidkv",
    "tova",
    "h2o",
    "knorm",
    "keydiff",
    "expected_attention",
    "streamingllm",
)
GRANULARITIES: tuple[str, ...] = ("page", "head")
#: ``vector``: VECTOR's key-only route off or on (a choice, as every switch-like setting here;
#: a JSON boolean is refused for every kv_ setting, docs/VECTOR.md).
VECTOR_CHOICES: tuple[str, ...] = ("off", "on")
#: ``vector_residual``: which pooled tokens keep their key only, by ``||v - W k||^2`` or by it
#: over ``||v||^2``. Relative by default: the absolute residual favours small values, the
#: attention sink's among them, and sent half the question's attention to rebuilt values on
#: SmolLM2 (docs/VECTOR.md, "Is the loss a bug?"; benchmarks/quality/VECTOR.md, "Gates").
VECTOR_RESIDUALS: tuple[str, ...] = ("absolute", "relative")
DEFAULT_VECTOR_RESIDUAL = "relative"
#: ``vector_min_r2``: heads whose calibration held-out R^2 is below this hold no key-only token;
#: 0.6 measured best of those tried on SmolLM2 (benchmarks/quality/VECTOR.md, "Gates").
DEFAULT_VECTOR_MIN_R2 = 0.6
POOLINGS: tuple[str, ...] = ("avg", "max")

#: Allocation used when the user names only a scorer (ALGORITHMS.md, "Defaults").
DEFAULT_ALLOCATION: dict[str, str] = {
    "criticalkv": "adakv",
    "snapkv": "adakv",
    "defensivekv": "adakv",
    "expected_attention": "adakv",
    "knorm": "adakv",
    "keydiff": "adakv",
    "laprox": "global",
    "pyramidkv": "pyramid",
    "streamingllm": "uniform",
    "tova": "uniform",
    "h2o": "uniform",
    "value_aware": "uniform",
    "lkv": "lkv",
    "none": "uniform",
}
#: Scorers that read the attention of the window's queries: they need a window of at least 1.
WINDOW_SCORERS: frozenset[str] = frozenset(
    {"snapkv", "pyramidkv", "tova", "h2o", "criticalkv", "defensivekv", "laprox", "value_aware"}
)
#: Sink tokens kept when the user does not say.
DEFAULT_SINKS: dict[str, int] = {"streamingllm": 4, "expected_attention": 4}

#: Tokens a KV head keeps at least under a fractional budget (``min_tokens``), window and sinks
#: included: the smallest floor measured past the short-prompt cliff (at ~900 tokens and budget
#: 0.1 criticalkv and snapkv score 0.00 without it, 0.67 with it, as at 0.2;
#: benchmarks/quality/FLOOR.md).
DEFAULT_MIN_TOKENS = 192

#: Flat key (CLI flag / vllm_xargs) -> field name.
FLAT_KEYS: dict[str, str] = {
    "kv_eviction": "scorer",
    "kv_budget": "budget",
    "kv_min_tokens": "min_tokens",
    "kv_allocation": "allocation",
    "kv_window": "window",
    "kv_sinks": "sinks",
    "kv_pooling": "pooling",
    "kv_pooling_kernel": "pooling_kernel",
    "kv_granularity": "granularity",
    "kv_head_selection": "head_selection",
    "kv_decode_interval": "decode_interval",
    "kv_prompt_eviction": "prompt_eviction",
    "kv_alpha": "alpha",
    "kv_rho": "rho",
    "kv_epsilon": "epsilon",
    "kv_criticalkv_base": "criticalkv_base",
    "kv_request_override": "request_override",
    "kv_lkv_artifact": "lkv_artifact",
    "kv_vector": "vector",
    "kv_vector_share": "vector_share",
    "kv_vector_artifact": "vector_artifact",
    "kv_vector_residual": "vector_residual",
    "kv_vector_min_r2": "vector_min_r2",
}
FIELD_TO_FLAT: dict[str, str] = {v: k for k, v in FLAT_KEYS.items()}
#: ``--kv-prompt-eviction``: whether the prompt is evicted after its prefill (``off``: only
#: decode-time eviction, ``--kv-decode-interval``, evicts).
PROMPT_EVICTIONS: tuple[str, ...] = ("on", "off")
#: Scorers decode-time eviction supports at page granularity: they read keys, values, the
#: window's queries and the ``o_proj`` weight, and nothing of the budget (tova reads the
#: window's last query, criticalkv its page score, which has no stage split), or (h2o) the
#: attention sums accumulated over every query run, decode steps included
#: (docs/DECODE_EVICTION.md). Refused, with the reason: expected_attention (pre-RoPE query
#: statistics are not gathered during decode), lkv (trained on prompt positions only).
DECODE_SCORERS: tuple[str, ...] = (
    "streamingllm", "snapkv", "pyramidkv", "knorm", "keydiff", "defensivekv", "laprox", "value_aware", "tova",
    "criticalkv", "h2o",
)
#: Head granularity: the scorers that score each KV head from its own tokens alone (every head
#: holds its own tokens at decode time, so they are scored head by head: policies/held.py);
#: defensivekv normalises across heads, laprox and value_aware read ``o_proj`` across heads
#: (not split per head yet), h2o's sums are accumulated over held tokens the same in every head
#: (page granularity) only. And the allocations that split one layer's budget from that
#: layer's scores (pyramid, global and lkv are refused: their budgets are not planned on held
#: tokens yet).
HEAD_DECODE_SCORERS: tuple[str, ...] = ("streamingllm", "snapkv", "pyramidkv", "knorm", "keydiff", "criticalkv")
#: Of those, the ones served with whole pages per head only (``head_selection_for(block_size)
#: == "page"``): criticalkv's page score reads each KV head's group of ``o_proj`` and no budget;
#: its single-token scores carry a two-stage split over the layer's heads, not planned on held
#: tokens yet.
HEAD_PAGE_DECODE_SCORERS: tuple[str, ...] = ("criticalkv",)
HEAD_DECODE_ALLOCATIONS: tuple[str, ...] = ("uniform", "adakv", "adakv_floor")
#: Settings of the server, never of one request (a request naming one is refused).
SERVER_ONLY: frozenset[str] = frozenset({"request_override"})
#: ``--kv-request-override``: what a request's ``vllm_xargs`` may change (docs/ARCHITECTURE.md).
REQUEST_OVERRIDES: tuple[str, ...] = ("any", "stricter", "none")
#: Key of the nested form inside vLLM's ``additional_config``.
ADDITIONAL_CONFIG_KEY = "kv_eviction"
FLAT_PREFIX = "kv_"


class EvictionConfigError(ValueError):
    """A policy setting is invalid. ``field`` is the name the user used; the message says why."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"invalid {field}={value!r}: {allowed}")


#: Allocations that split one layer's pages across its heads from that layer's scores alone
#: (``head_selection="page"`` runs them on page scores).
HEAD_PAGE_ALLOCATIONS = ("uniform", "adakv", "adakv_floor", "lkv")
#: Largest block size at which head granularity keeps whole pages per head by default: at 16 and
#: 32 tokens whole pages kept needles at least as well as single tokens, at vLLM CPU's default
#: 128 they lost them (benchmarks/quality/HEAD_VS_PAGE.md).
HEAD_PAGE_MAX_BLOCK_SIZE = 32


#: Settings only some policies read, and which (a value set for a policy that ignores it is
#: refused, not ignored).
SCORER_SETTINGS: dict[str, str] = {
    "rho": "criticalkv",
    "epsilon": "criticalkv",
    "criticalkv_base": "criticalkv",
    "pooling": "snapkv, pyramidkv (and criticalkv over them)",
    "pooling_kernel": "snapkv, pyramidkv, defensivekv (and criticalkv over snapkv or pyramidkv)",
    "alpha": "the adakv and adakv_floor allocations",
    "head_selection": "head granularity",
    "lkv_artifact": "the lkv scorer and the lkv allocation",
    "decode_interval": "page granularity with " + ", ".join(DECODE_SCORERS) + "; head granularity with "
    + ", ".join(HEAD_DECODE_SCORERS) + " under allocation " + ", ".join(HEAD_DECODE_ALLOCATIONS),
    "prompt_eviction": "decode-time eviction (decode_interval > 0): page granularity with "
    + ", ".join(DECODE_SCORERS) + "; head granularity with " + ", ".join(HEAD_DECODE_SCORERS)
    + " under allocation " + ", ".join(HEAD_DECODE_ALLOCATIONS),
    "vector": "every scorer (not none)",
    "vector_share": "kv_vector on",
    "vector_artifact": "kv_vector on",
    "vector_residual": "kv_vector on",
    "vector_min_r2": "kv_vector on",
}
_POOLING_SCORERS = frozenset({"snapkv", "pyramidkv"})


def reads_setting(fields: Mapping[str, Any], name: str) -> bool:
    """Whether the policy of ``fields`` (field names, before validation) reads setting ``name``."""
    scorer = fields.get("scorer", "none")
    base = fields.get("criticalkv_base", "snapkv") if scorer == "criticalkv" else None
    if name in ("rho", "epsilon", "criticalkv_base"):
        return scorer == "criticalkv"
    if name == "lkv_artifact":
        return scorer == "lkv" or fields.get("allocation") == "lkv"
    if name == "vector":
        return scorer != "none"
    if name in ("vector_share", "vector_artifact", "vector_residual", "vector_min_r2"):
        return fields.get("vector", "off") == "on"
    if name == "pooling":
        return scorer in _POOLING_SCORERS or base in _POOLING_SCORERS
    if name == "pooling_kernel":
        return scorer in _POOLING_SCORERS | {"defensivekv"} or base in _POOLING_SCORERS
    allocation = fields.get("allocation") or DEFAULT_ALLOCATION.get(scorer, "uniform")
    if name in ("decode_interval", "prompt_eviction"):
        granularity = fields.get("granularity") or ("page" if allocation == "uniform" else "head")
        if granularity == "head":
            return (scorer in HEAD_DECODE_SCORERS and allocation in HEAD_DECODE_ALLOCATIONS
                    and fields.get("vector", "off") != "on")
        return scorer in DECODE_SCORERS
    if name == "alpha":
        return allocation in ("adakv", "adakv_floor")
    if name == "head_selection":
        default = "page" if allocation == "uniform" and fields.get("vector", "off") != "on" else "head"
        granularity = fields.get("granularity") or default
        return granularity == "head"
    return True
