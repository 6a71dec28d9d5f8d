"""The one validated eviction policy object (:class:`EvictionConfig`) and its three doors."""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Literal, Mapping, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vllm_kvevict.config.choices import (
    ADDITIONAL_CONFIG_KEY, ALLOCATIONS, CRITICALKV_BASES, DECODE_SCORERS, HEAD_DECODE_ALLOCATIONS,
    HEAD_DECODE_SCORERS, HEAD_PAGE_DECODE_SCORERS, DEFAULT_ALLOCATION, DEFAULT_MIN_TOKENS, DEFAULT_SINKS,
    DEFAULT_VECTOR_MIN_R2, DEFAULT_VECTOR_RESIDUAL, FIELD_TO_FLAT, FLAT_KEYS, FLAT_PREFIX, GRANULARITIES,
    HEAD_PAGE_ALLOCATIONS, HEAD_PAGE_MAX_BLOCK_SIZE, POOLINGS, PROMPT_EVICTIONS, REQUEST_OVERRIDES,
    SCORER_SETTINGS, SCORERS, VECTOR_CHOICES, VECTOR_RESIDUALS, WINDOW_SCORERS, EvictionConfigError,
    reads_setting,
)
from vllm_kvevict.config.parsing import BUDGET_ALLOWED, coerce_text, merge_fields, validated


class EvictionConfig(BaseModel):
    """An eviction policy. Defaults follow ALGORITHMS.md."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    scorer: Literal[SCORERS] = Field("none", description="scoring policy; 'none' keeps vLLM as is")  # type: ignore[valid-type]
    budget: Union[int, float] = Field(
        1.0,
        description="tokens kept per KV head, window included: a fraction of the prompt in "
        "(0, 1), 1 to keep everything, or a whole token count > 1",
    )
    min_tokens: int = Field(
        DEFAULT_MIN_TOKENS,
        ge=0,
        description="floor of a fractional budget: each KV head keeps max(int(L * budget), "
        "min_tokens) tokens (window and sinks included), never more than the prompt; 0 turns it "
        "off; not read by token-count budgets (benchmarks/quality/FLOOR.md)",
    )
    allocation: Optional[Literal[ALLOCATIONS]] = Field(  # type: ignore[valid-type]
        None, description="how a layer's budget is split across KV heads (default: per scorer)"
    )
    window: int = Field(32, ge=0, description="observation window: last W prompt tokens, always kept")
    sinks: Optional[int] = Field(None, ge=0, description="first S tokens always kept (default: per scorer)")
    pooling: Literal[POOLINGS] = Field("avg", description="pooling of window attention along tokens")  # type: ignore[valid-type]
    pooling_kernel: int = Field(5, ge=1, description="pooling kernel size (odd); 1 disables pooling")
    granularity: Optional[Literal[GRANULARITIES]] = Field(  # type: ignore[valid-type]
        None,
        description="evict whole pages, or per-head tokens compacted into head-pages "
        "(default: head when the allocation is not uniform, else page)",
    )
    head_selection: Optional[Literal["token", "page"]] = Field(
        None,
        description="head granularity: keep each KV head's best whole block-aligned pages "
        "(no head-page left partly empty), or its best single tokens (default: page where the "
        "allocation is uniform, adakv or adakv_floor and the block size at most 32, else token)",
    )
    request_override: Literal[REQUEST_OVERRIDES] = Field(  # type: ignore[valid-type]
        "any",
        description="server setting: what requests may change through vllm_xargs: 'any' setting; "
        "'stricter' only a budget no larger than the server's (same scorer, allocation, granularity, "
        "no larger window or sinks, no opting out); 'none' nothing",
    )
    decode_interval: int = Field(
        0,
        ge=0,
        description="decode-time eviction: once N tokens were generated since the last eviction, "
        "score every held token again (window: the last W generated tokens' queries) and evict back "
        "to the budget; 0 never (docs/DECODE_EVICTION.md: what it supports)",
    )
    prompt_eviction: Literal[PROMPT_EVICTIONS] = Field(  # type: ignore[valid-type]
        "on",
        description="evict the prompt after its prefill; 'off' keeps it whole and only decode-time "
        "eviction (decode_interval > 0) evicts",
    )
    alpha: float = Field(0.2, ge=0.0, le=1.0, description="Ada-KV: share of the budget spread uniformly")
    rho: float = Field(0.5, ge=0.0, le=1.0, description="CriticalKV: share of the budget chosen by stage 1")
    epsilon: float = Field(
        0.0,
        ge=0.0,
        description="CriticalKV: eps in stage 2's (attention + eps) * value norm; 0 is the paper's "
        "criterion, 1e-4 the authors' code and kvpress (docs/NEEDLE_STUDY.md)",
    )
    criticalkv_base: Literal[CRITICALKV_BASES] = Field(  # type: ignore[valid-type]
        "snapkv", description="CriticalKV: the scorer whose score its two stages rank by"
    )
    lkv_artifact: Optional[str] = Field(
        None,
        description="lkv: the trained artifact file (safetensors; default: the one packaged for the served model)",
    )

    vector: Literal[VECTOR_CHOICES] = Field(  # type: ignore[valid-type]
        "off",
        description="VECTOR: pooled tokens whose values a calibrated regression on the key rebuilds keep "
        "their key only (two per slot; memory equals plain eviction at the budget); served by the "
        "reference engine and the plugin on vLLM-CPU (docs/VECTOR.md)",
    )
    vector_share: Optional[float] = Field(
        None,
        gt=0.0,
        le=0.5,
        description="VECTOR: p_a, the prompt share moved to key-only slots (2 p_a key-only tokens); unset: "
        "the smaller of p_c/2 and (1 - p_c)/2 with p_c = 1 - budget",
    )
    vector_artifact: Optional[str] = Field(
        None,
        description="VECTOR: the calibrated artifact file (safetensors; default: the one packaged for the served model)",
    )
    vector_residual: Literal[VECTOR_RESIDUALS] = Field(  # type: ignore[valid-type]
        DEFAULT_VECTOR_RESIDUAL, description="VECTOR: which pooled tokens keep their key only: the smallest "
        "||v - W k||^2 (absolute) or ||v - W k||^2 / ||v||^2 (relative)")
    vector_min_r2: float = Field(
        DEFAULT_VECTOR_MIN_R2, ge=0.0, le=1.0, description="VECTOR: heads whose calibration held-out R^2 is "
        "below this keep every pooled token whole (0: every head may hold key-only tokens)")

    @field_validator(
        "budget", "min_tokens", "window", "sinks", "pooling_kernel", "decode_interval", "alpha", "rho", "epsilon",
        "vector_share", "vector_min_r2", mode="before",
    )
    @classmethod
    def _no_bools(cls, value: Any, info) -> Any:
        # pydantic's lax mode reads True as 1; a boolean is never a meaningful number here.
        if isinstance(value, bool):
            raise EvictionConfigError(info.field_name, value, "a number, not a boolean")
        return value

    @model_validator(mode="after")
    def _check(self) -> "EvictionConfig":
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b):
            raise EvictionConfigError("budget", b, BUDGET_ALLOWED)
        if b <= 0 or (b > 1 and float(b) != int(b)):
            raise EvictionConfigError("budget", b, BUDGET_ALLOWED)
        if self.is_token_budget and "min_tokens" in self.model_fields_set and self.min_tokens != 0:
            raise EvictionConfigError(
                "min_tokens",
                self.min_tokens,
                f"0 with a token-count budget ({int(b)} tokens is already the count each head keeps); "
                "the floor applies to fractional budgets",
            )
        if self.window == 0 and self.scorer in WINDOW_SCORERS:
            raise EvictionConfigError("window", 0, f"an integer >= 1 ({self.scorer} scores with the window's queries)")
        if self.head_selection == "page" and self.resolved_allocation not in HEAD_PAGE_ALLOCATIONS:
            raise EvictionConfigError(
                "head_selection",
                "page",
                f"'token' with allocation {self.resolved_allocation!r}; whole pages per head need one of "
                + ", ".join(HEAD_PAGE_ALLOCATIONS),
            )
        self._check_decode()
        for name in SCORER_SETTINGS:
            if name in self.model_fields_set and getattr(self, name) != type(self).model_fields[name].default \
                    and not reads_setting(self.model_dump(), name):
                raise EvictionConfigError(
                    name, getattr(self, name), f"not read by {self.describe_policy()}; it applies to {SCORER_SETTINGS[name]}"
                )
        if self.lkv_artifact is not None and not os.path.isfile(self.lkv_artifact):
            raise EvictionConfigError("lkv_artifact", self.lkv_artifact, "an existing LKV artifact file (safetensors)")
        if self.vector_artifact is not None and not os.path.isfile(self.vector_artifact):
            raise EvictionConfigError("vector_artifact", self.vector_artifact,
                                      "an existing VECTOR artifact file (python -m vllm_kvevict.vector.calibrate)")
        if self.vector == "on" and self.granularity == "page":
            raise EvictionConfigError("vector", "on", "off at granularity page (VECTOR keeps per-head routes: granularity head)")
        if self.vector == "on" and self.head_selection == "page":
            raise EvictionConfigError("vector", "on", "off with head_selection page (VECTOR routes single tokens)")
        if self.pooling_kernel % 2 == 0:
            raise EvictionConfigError("pooling_kernel", self.pooling_kernel, "an odd integer >= 1")
        if self.is_token_budget and self.window + self.resolved_sinks > self.budget:
            raise EvictionConfigError(
                "window",
                self.window,
                f"window + sinks ({self.window} + {self.resolved_sinks}) must fit in the "
                f"budget of {int(self.budget)} tokens",
            )
        return self

    def _check_decode(self) -> None:
        """Decode-time eviction's settings (checked once a scorer is named: flags are first
        checked one by one on a policy without one)."""
        if not self.enabled:
            return
        if self.prompt_eviction == "off" and self.decode_interval == 0:
            raise EvictionConfigError(
                "prompt_eviction", "off", "'on' unless decode_interval > 0 (with neither, nothing would be evicted)"
            )
        if self.decode_interval == 0:
            return
        n = self.decode_interval
        if self.resolved_granularity == "head":
            self._check_head_decode(n)
        elif self.scorer not in DECODE_SCORERS:
            raise EvictionConfigError(
                "decode_interval", n,
                f"0 with scorer {self.scorer!r}: decode-time eviction supports " + ", ".join(DECODE_SCORERS),
            )
        if self.scorer == "criticalkv":
            # over h2o: its needs would carry h2o's sums, but no decode exactness test covers it yet
            bases = [b for b in (HEAD_DECODE_SCORERS if self.resolved_granularity == "head" else DECODE_SCORERS)
                     if b not in ("criticalkv", "h2o")]
            if self.criticalkv_base not in bases:
                raise EvictionConfigError(
                    "decode_interval", n,
                    f"0 with criticalkv over {self.criticalkv_base!r} at granularity {self.resolved_granularity!r}: "
                    "its base must be one decode-time eviction supports there: " + ", ".join(bases),
                )
        if n < self.window:
            raise EvictionConfigError(
                "decode_interval", n, f"an integer >= the window ({self.window}): the window's queries are "
                "those of tokens generated since the last eviction",
            )

    def _check_head_decode(self, n: int) -> None:
        """What decode-time eviction at head granularity supports (docs/DECODE_EVICTION.md)."""
        page = "; page granularity supports " + ", ".join(DECODE_SCORERS)
        if self.scorer not in HEAD_DECODE_SCORERS:
            raise EvictionConfigError(
                "decode_interval", n,
                f"0 with scorer {self.scorer!r} at granularity 'head': decode-time eviction at head granularity "
                "supports " + ", ".join(HEAD_DECODE_SCORERS) + page,
            )
        if self.resolved_allocation not in HEAD_DECODE_ALLOCATIONS:
            raise EvictionConfigError(
                "decode_interval", n,
                f"0 with allocation {self.resolved_allocation!r} at granularity 'head': decode-time eviction at "
                "head granularity supports the allocations " + ", ".join(HEAD_DECODE_ALLOCATIONS)
                + " (or set granularity to 'page')",
            )
        if self.vector == "on":
            raise EvictionConfigError("decode_interval", n, "0 with vector on: VECTOR is not evicted during decode")
        if self.scorer in HEAD_PAGE_DECODE_SCORERS and (self.head_selection == "token"
                                                        or self.resolved_allocation not in HEAD_PAGE_ALLOCATIONS):
            raise EvictionConfigError("decode_interval", n, self._whole_pages_only())

    def _whole_pages_only(self) -> str:
        return (f"0 with scorer {self.scorer!r} and single tokens per head: at head granularity its decode-time "
                "eviction keeps whole pages per head (head_selection 'page', allocation "
                + ", ".join(a for a in HEAD_PAGE_ALLOCATIONS if a != "lkv")
                + f", block size <= {HEAD_PAGE_MAX_BLOCK_SIZE} unless head_selection is 'page'), or set granularity to 'page'")

    def check_block_size(self, block_size: int, naming: Callable[[str], str] = lambda f: f) -> None:
        """What only the KV cache's block size decides: a scorer of
        :data:`HEAD_PAGE_DECODE_SCORERS` evicting during decode at head granularity needs whole
        pages per head at this block size (``head_selection`` unset picks single tokens above
        :data:`HEAD_PAGE_MAX_BLOCK_SIZE`). Raises :class:`EvictionConfigError`."""
        if (self.evicts_during_decode and self.resolved_granularity == "head"
                and self.scorer in HEAD_PAGE_DECODE_SCORERS and self.head_selection_for(block_size) != "page"):
            raise EvictionConfigError(naming("decode_interval"), self.decode_interval,
                                      self._whole_pages_only() + f" (the KV cache's block size is {block_size})")

    # ----------------------------------------------------------------- derived values
    @property
    def evicts_prompt(self) -> bool:
        """Whether the prompt is evicted after its prefill."""
        return self.enabled and self.prompt_eviction == "on"

    @property
    def evicts_during_decode(self) -> bool:
        """Whether held tokens are evicted again every ``decode_interval`` generated tokens."""
        return self.enabled and self.decode_interval > 0

    @property
    def enabled(self) -> bool:
        return self.scorer != "none"

    @property
    def keeps_everything(self) -> bool:
        return not self.enabled or (not self.is_token_budget and self.budget >= 1)

    @property
    def is_token_budget(self) -> bool:
        return self.budget > 1

    @property
    def resolved_allocation(self) -> str:
        return self.allocation or DEFAULT_ALLOCATION[self.scorer]

    @property
    def resolved_granularity(self) -> str:
        """``head`` for per-head (unequal) allocations, ``page`` for uniform ones, unless set."""
        if self.granularity is not None:
            return self.granularity
        return "page" if self.resolved_allocation == "uniform" and self.vector != "on" else "head"

    def head_selection_for(self, block_size: int) -> str:
        """``page`` (whole pages per head) for per-layer allocations on pages of at most
        :data:`HEAD_PAGE_MAX_BLOCK_SIZE` tokens, ``token`` otherwise, unless set."""
        if self.head_selection is not None:
            return self.head_selection
        if self.vector == "on":
            return "token"
        page = self.resolved_allocation in HEAD_PAGE_ALLOCATIONS and block_size <= HEAD_PAGE_MAX_BLOCK_SIZE
        return "page" if page else "token"

    @property
    def resolved_sinks(self) -> int:
        return self.sinks if self.sinks is not None else DEFAULT_SINKS.get(self.scorer, 0)

    def budget_tokens(self, prompt_len: int) -> int:
        """Tokens kept per KV head for a prompt of ``prompt_len`` tokens (window+sinks at least).

        Every budget becomes a token count here and nowhere else. Fractions round down like
        kvpress (``int(L * budget)``) and are raised to ``min_tokens``; the result is clamped to
        ``[min(L, window + sinks), L]``. A token-count budget is its count (no floor).
        """
        if self.keeps_everything:
            return prompt_len
        if self.is_token_budget:
            raw = int(self.budget)
        else:
            raw = max(int(prompt_len * float(self.budget)), self.min_tokens)
        floor = min(prompt_len, self.window + self.resolved_sinks)
        return max(floor, min(raw, prompt_len))

    def budget_target(self, prompt_len: int) -> float:
        """Unrounded tokens per head (PyramidKV's schedule and CriticalKV's uniform stage 1 read
        it): ``L * budget`` raised to ``min_tokens`` for a fraction, never above ``L``; the count
        of a token budget; ``L`` when everything is kept."""
        if self.keeps_everything:
            return float(prompt_len)
        if self.is_token_budget:
            return float(int(self.budget))
        return min(float(prompt_len), max(prompt_len * float(self.budget), float(self.min_tokens)))

    def vector_share_for(self, prompt_len: int) -> float:
        """VECTOR's ``p_a`` for a prompt: ``vector_share``, else ``min(p_c/2, (1-p_c)/2)`` with
        ``p_c = 1 - budget_tokens(L) / L``."""
        if self.vector_share is not None:
            return float(self.vector_share)
        kept = self.budget_tokens(prompt_len) / prompt_len
        return min((1.0 - kept) / 2.0, kept / 2.0)

    # ----------------------------------------------------------------- the three doors
    @classmethod
    def from_fields(cls, **fields: Any) -> "EvictionConfig":
        """Build from field names (``scorer=``, ``budget=``...); errors name those fields."""
        return validated(cls, fields, naming=lambda f: f)

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any], base: Optional["EvictionConfig"] = None) -> "EvictionConfig":
        """Build from flat ``kv_*`` keys (CLI flags, ``vllm_xargs``), on top of ``base``.

        Keys that do not start with ``kv_`` are ignored (they belong to others); an unknown
        ``kv_`` key is an error naming it.
        """
        fields: dict[str, Any] = {}
        for key, value in flat.items():
            if not key.startswith(FLAT_PREFIX):
                continue
            if key not in FLAT_KEYS:
                raise EvictionConfigError(key, value, f"unknown key; allowed: {', '.join(FLAT_KEYS)}")
            fields[FLAT_KEYS[key]] = coerce_text(value)
        merged = merge_fields(base, fields)
        return validated(cls, merged, naming=lambda f: FIELD_TO_FLAT.get(f, f))

    @classmethod
    def from_additional_config(cls, additional_config: Optional[Mapping[str, Any]]) -> "EvictionConfig":
        """Build from vLLM's ``additional_config`` (``{"kv_eviction": {...}}``); absent -> none.

        ``{"kv_eviction": "snapkv", "kv_budget": 0.2}`` (flat keys at the top level) works too.
        """
        if not additional_config:
            return cls()
        nested = additional_config.get(ADDITIONAL_CONFIG_KEY)
        if isinstance(nested, Mapping):
            return validated(cls, dict(nested), naming=lambda f: f"{ADDITIONAL_CONFIG_KEY}.{f}")
        return cls.from_flat(additional_config)

    def to_additional_config(self) -> dict[str, Any]:
        """Nested form for ``additional_config``; only fields that differ from the defaults."""
        return {ADDITIONAL_CONFIG_KEY: self.model_dump(exclude_defaults=True)}

    def to_flat(self) -> dict[str, Any]:
        return {FIELD_TO_FLAT[k]: v for k, v in self.model_dump(exclude_defaults=True).items()}

    def describe_policy(self) -> str:
        """``scorer`` (with its allocation and granularity), for messages."""
        return f"{self.scorer} (allocation {self.resolved_allocation}, granularity {self.resolved_granularity})"

    def describe(self) -> str:
        if not self.enabled:
            return "none"
        floor = f" min_tokens={self.min_tokens}" if not self.is_token_budget else ""
        return (
            f"{self.scorer} budget={self.budget}{floor} allocation={self.resolved_allocation} "
            f"granularity={self.resolved_granularity} window={self.window} sinks={self.resolved_sinks}"
            + (f" vector=on vector_residual={self.vector_residual} vector_min_r2={self.vector_min_r2:g}"
               if self.vector == "on" else "")
        )
