"""How a config's fields are read from the outside: text coerced to numbers, a request's keys
merged onto the server's config, and pydantic's errors turned into :class:`EvictionConfigError`
naming the field as the user spelled it."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import ValidationError

from vllm_kvevict.config.choices import (
    ALLOCATIONS,
    CRITICALKV_BASES,
    GRANULARITIES,
    POOLINGS,
    SCORER_SETTINGS,
    SCORERS,
    VECTOR_CHOICES,
    VECTOR_RESIDUALS,
    EvictionConfigError,
    reads_setting,
)

BUDGET_ALLOWED = "a fraction in (0, 1), 1 to keep everything, or a whole token count > 1"


def coerce_text(value: Any) -> Any:
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


def merge_fields(base: Optional["EvictionConfig"], fields: dict[str, Any]) -> dict[str, Any]:
    if base is None:
        return fields
    merged = base.model_dump(exclude_defaults=True)
    # A request that changes the scorer gets that scorer's default allocation and sinks, and
    # none of the base's settings its new scorer does not read, unless it names them too.
    # The server's floor is not read by a request's token-count budget (refused if named).
    if is_token_count(fields.get("budget")) and "min_tokens" not in fields:
        merged.pop("min_tokens", None)
    if "scorer" in fields and fields["scorer"] != base.scorer:
        merged.pop("allocation", None)
        merged.pop("sinks", None)
        probe = {**merged, **fields}
        for name in SCORER_SETTINGS:
            if name in merged and name not in fields and not reads_setting(probe, name):
                merged.pop(name)
    merged.update(fields)
    return merged


def is_token_count(budget: Any) -> bool:
    return isinstance(budget, (int, float)) and not isinstance(budget, bool) and budget > 1


def validated(cls: type, fields: dict[str, Any], naming) -> Any:
    """``cls(**fields)`` (an :class:`EvictionConfig`), every failure an :class:`EvictionConfigError`
    whose field is spelled by ``naming``."""
    try:
        return cls(**fields)
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
            allowed = "unknown key; allowed: " + ", ".join(naming(f) for f in cls.model_fields)
            raise EvictionConfigError(naming(field), err.get("input"), allowed) from None
        raise EvictionConfigError(naming(field), err.get("input"), allowed_text(field, err)) from None


def allowed_text(field: str, err: dict) -> str:
    choices = {
        "scorer": SCORERS,
        "allocation": ALLOCATIONS,
        "granularity": GRANULARITIES,
        "pooling": POOLINGS,
        "criticalkv_base": CRITICALKV_BASES,
        "vector": VECTOR_CHOICES,
        "vector_residual": VECTOR_RESIDUALS,
    }
    if field in choices:
        return "allowed: " + ", ".join(choices[field])
    if field == "budget":
        return BUDGET_ALLOWED
    if field == "vector_min_r2":
        return "a held-out R^2 threshold in [0, 1] (0: every head may hold key-only tokens)"
    if field == "min_tokens":
        return "a whole token count >= 0 (0 turns the floor off)"
    return err.get("msg", "invalid value")
