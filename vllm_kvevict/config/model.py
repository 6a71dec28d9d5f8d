"""The one validated eviction policy object (:class:`EvictionConfig`) and its three doors."""

from __future__ import annotations

import math
import os
from typing import Any, Literal, Mapping, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vllm_kvevict.config.choices import (
    ADDITIONAL_CONFIG_KEY,
    ALLOCATIONS,
    CRITICALKV_BASES,
    DEFAULT_ALLOCATION,
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
    VECTOR_CHOICES,
    WINDOW_SCORERS,
    EvictionConfigError,
    reads_setting,
)


class EvictionConfig(BaseModel):
    """An eviction policy. Defaults follow ALGORITHMS.md."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    scorer: Literal[SCORERS] = Field("none", description="scoring policy; 'none' keeps vLLM as is")  # type: ignore[valid-type]
    budget: Union[int, float] = Field(
        1.0,
        description="tokens kept per KV head, window included: a fraction of the prompt in "
        "(0, 1), 1 to keep everything, or a whole token count > 1",
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
        0, ge=0, description="re-compress every N decoded tokens; only 0 (never) until decode-time eviction lands"
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
        "reference engine only for now (docs/VECTOR.md)",
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

    @field_validator(
        "budget", "window", "sinks", "pooling_kernel", "decode_interval", "alpha", "rho", "epsilon", "vector_share",
        mode="before",
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
            raise EvictionConfigError("budget", b, _BUDGET_ALLOWED)
        if b <= 0 or (b > 1 and float(b) != int(b)):
            raise EvictionConfigError("budget", b, _BUDGET_ALLOWED)
        if self.window == 0 and self.scorer in WINDOW_SCORERS:
            raise EvictionConfigError("window", 0, f"an integer >= 1 ({self.scorer} scores with the window's queries)")
        if self.head_selection == "page" and self.resolved_allocation not in HEAD_PAGE_ALLOCATIONS:
            raise EvictionConfigError(
                "head_selection",
                "page",
                f"'token' with allocation {self.resolved_allocation!r}; whole pages per head need one of "
                + ", ".join(HEAD_PAGE_ALLOCATIONS),
            )
        for name in SCORER_SETTINGS:
            if name in self.model_fields_set and getattr(self, name) != type(self).model_fields[name].default \
                    and not reads_setting(self.model_dump(), name):
                raise EvictionConfigError(
                    name, getattr(self, name), f"not read by {self.describe_policy()}; it applies to {SCORER_SETTINGS[name]}"
                )
        if self.decode_interval != 0:
            raise EvictionConfigError(
                "decode_interval", self.decode_interval, "0 (decode-time eviction is not implemented yet)"
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

    # ----------------------------------------------------------------- derived values
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

        Fractions round down like kvpress (``int(L * budget)``); the result is clamped to
        ``[min(L, window + sinks), L]``.
        """
        if self.keeps_everything:
            return prompt_len
        raw = int(self.budget) if self.is_token_budget else int(prompt_len * float(self.budget))
        floor = min(prompt_len, self.window + self.resolved_sinks)
        return max(floor, min(raw, prompt_len))

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
        return _validate(fields, naming=lambda f: f)

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
            fields[FLAT_KEYS[key]] = _coerce_text(value)
        merged = _merge(base, fields)
        return _validate(merged, naming=lambda f: FIELD_TO_FLAT.get(f, f))

    @classmethod
    def from_additional_config(cls, additional_config: Optional[Mapping[str, Any]]) -> "EvictionConfig":
        """Build from vLLM's ``additional_config`` (``{"kv_eviction": {...}}``); absent -> none.

        ``{"kv_eviction": "snapkv", "kv_budget": 0.2}`` (flat keys at the top level) works too.
        """
        if not additional_config:
            return cls()
        nested = additional_config.get(ADDITIONAL_CONFIG_KEY)
        if isinstance(nested, Mapping):
            return _validate(dict(nested), naming=lambda f: f"{ADDITIONAL_CONFIG_KEY}.{f}")
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
        return (
            f"{self.scorer} budget={self.budget} allocation={self.resolved_allocation} "
            f"granularity={self.resolved_granularity} window={self.window} sinks={self.resolved_sinks}"
            + (" vector=on" if self.vector == "on" else "")
        )


_BUDGET_ALLOWED = "a fraction in (0, 1), 1 to keep everything, or a whole token count > 1"


def _coerce_text(value: Any) -> Any:
    """Values from CLI/JSON may arrive as strings: '0.1' -> 0.1, '256' -> 256."""
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            return text
    return value


def _merge(base: Optional[EvictionConfig], fields: dict[str, Any]) -> dict[str, Any]:
    if base is None:
        return fields
    merged = base.model_dump(exclude_defaults=True)
    # A request that changes the scorer gets that scorer's default allocation and sinks, and
    # none of the base's settings its new scorer does not read, unless it names them too.
    if "scorer" in fields and fields["scorer"] != base.scorer:
        merged.pop("allocation", None)
        merged.pop("sinks", None)
        probe = {**merged, **fields}
        for name in SCORER_SETTINGS:
            if name in merged and name not in fields and not reads_setting(probe, name):
                merged.pop(name)
    merged.update(fields)
    return merged


def _validate(fields: dict[str, Any], naming) -> EvictionConfig:
    try:
        return EvictionConfig(**fields)
    except EvictionConfigError as exc:
        raise EvictionConfigError(naming(exc.field), exc.value, exc.allowed) from None
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = err.get("loc") or ("",)
        field = str(loc[0])
        if err.get("type") == "value_error" and isinstance(err.get("ctx", {}).get("error"), EvictionConfigError):
            inner: EvictionConfigError = err["ctx"]["error"]
            raise EvictionConfigError(naming(inner.field), inner.value, inner.allowed) from None
        if err.get("type") == "extra_forbidden":
            allowed = "unknown key; allowed: " + ", ".join(naming(f) for f in EvictionConfig.model_fields)
            raise EvictionConfigError(naming(field), err.get("input"), allowed) from None
        raise EvictionConfigError(naming(field), err.get("input"), _allowed_text(field, err)) from None


def _allowed_text(field: str, err: dict) -> str:
    choices = {
        "scorer": SCORERS,
        "allocation": ALLOCATIONS,
        "granularity": GRANULARITIES,
        "pooling": POOLINGS,
        "criticalkv_base": CRITICALKV_BASES,
        "vector": VECTOR_CHOICES,
    }
    if field in choices:
        return "allowed: " + ", ".join(choices[field])
    if field == "budget":
        return _BUDGET_ALLOWED
    return err.get("msg", "invalid value")
