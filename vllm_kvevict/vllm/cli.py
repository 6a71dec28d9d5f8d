"""The ``--kv-*`` flags of ``vllm serve`` / ``EngineArgs``, and their path into ``additional_config``.

One flag per :data:`vllm_kvevict.config.FLAT_KEYS` entry, generated from
:class:`~vllm_kvevict.config.EvictionConfig` (choices, defaults and help come from the model),
in their own argument group ``KVEviction`` (``vllm serve --help=KVEviction`` lists them).

Path of a flag (the hooks are in :mod:`vllm_kvevict.vllm.compat`):

1. ``EngineArgs.add_cli_args`` (patched) adds the group. vLLM loads general plugins inside
   ``AsyncEngineArgs.add_cli_args`` just before it calls ``EngineArgs.add_cli_args``, so the
   patch is in place when ``vllm serve`` builds its parser. Each value is checked on its own
   by the flag's ``type`` (a bad value is an argparse usage error naming the flag).
2. ``EngineArgs.from_cli_args`` (patched) merges the flags the user gave (flags have no argparse
   default, so absent flags stay absent) over ``--additional-config``'s ``kv_eviction`` entry,
   validates the whole policy, and stores it as ``additional_config["kv_eviction"]`` (nested
   form, non-default fields only).
3. ``EngineArgs.create_engine_config`` (patched) validates ``additional_config`` however it was
   given (flags, ``--additional-config``, ``LLM(..., additional_config=...)``) and brings it to
   the nested form, so a bad policy fails at start-up with the field named, in the process that
   starts the engine.

``--kv-eviction=none`` (the default) with no other ``kv`` setting leaves ``additional_config``
untouched, so vLLM sees exactly what it would see without the plugin.
"""

from __future__ import annotations

import argparse
import re
import sys
import typing
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from vllm_kvevict.config import (
    ADDITIONAL_CONFIG_KEY,
    FLAT_KEYS,
    SCORER_SETTINGS,
    EvictionConfig,
    EvictionConfigError,
)

GROUP_TITLE = "KVEviction"
GROUP_DESCRIPTION = (
    "KV-cache eviction (vllm-kvevict): after a request's prompt is prefilled, keep only the "
    "KV entries its policy scores highest and return the freed blocks to vLLM's pool. "
    "Per request: extra_body={'vllm_xargs': {'kv_eviction': ..., 'kv_budget': ...}}. Also "
    "settable as --additional-config '{\"kv_eviction\": {...}}'."
)
#: Bases under which one flag can be checked alone: a window of 1 fits any token budget, so the
#: cross-field rules (window + sinks <= token budget; a setting only some policies read) never
#: blame another flag; the settings only some policies read are checked under one that reads
#: them all (criticalkv over snapkv, adakv, head granularity), all flags together later.
_SINGLE_FLAG_BASE = EvictionConfig(window=1)
_READING_BASE = EvictionConfig(scorer="criticalkv", window=1)
#: Where decode-time eviction's and VECTOR's settings are read (checked one by one on them; VECTOR
#: refuses page head selection, so it is not part of the bases above).
_DECODE_BASE = EvictionConfig(scorer="snapkv", granularity="page", window=1, decode_interval=1)
_VECTOR_BASE = EvictionConfig(scorer="criticalkv", window=1, vector="on")
_FLAG_BASES = {"kv_decode_interval": _DECODE_BASE, "kv_prompt_eviction": _DECODE_BASE,
               "kv_vector_share": _VECTOR_BASE, "kv_vector_artifact": _VECTOR_BASE,
               "kv_vector_residual": _VECTOR_BASE, "kv_vector_min_r2": _VECTOR_BASE}
_PER_SCORER = "per scorer"
#: A description's own "(default: ...)" note; the flag's help states the default once.
_OWN_DEFAULT = re.compile(r"\s*\(default:[^)]*\)\s*$")


@dataclass(frozen=True)
class FlagSpec:
    """One ``--kv-*`` flag, derived from an :class:`EvictionConfig` field."""

    key: str  # flat key and argparse dest, e.g. "kv_budget"
    field: str  # EvictionConfig field, e.g. "budget"
    choices: Optional[tuple[str, ...]]
    default_text: str
    help: str

    @property
    def option(self) -> str:
        return "--" + self.key.replace("_", "-")


def flag_specs() -> list[FlagSpec]:
    """The flags, in :data:`FLAT_KEYS` order."""
    specs = []
    for key, field in FLAT_KEYS.items():
        info = EvictionConfig.model_fields[field]
        default = info.default
        default_text = _PER_SCORER if default is None else str(default)
        description = _OWN_DEFAULT.sub("", info.description or field)
        help_text = f"{description} (default: {default_text})"
        specs.append(FlagSpec(key, field, _literal_choices(info.annotation), default_text, help_text))
    return specs


def parse_flag_value(key: str, text: str) -> Any:
    """Check one flag's value on its own; return it typed ('0.1' -> 0.1).

    Raises
    ------
    argparse.ArgumentTypeError
        Naming the flag's key, the value and what is allowed (argparse prefixes the option).
    """
    try:
        base = _FLAG_BASES.get(key) or (_READING_BASE if FLAT_KEYS[key] in SCORER_SETTINGS else _SINGLE_FLAG_BASE)
        config = EvictionConfig.from_flat({key: text}, base=base)
    except EvictionConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return getattr(config, FLAT_KEYS[key])


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Add the ``KVEviction`` group to ``parser`` (no-op if it is there already)."""
    if "--kv-eviction" in parser._option_string_actions:
        return
    group = parser.add_argument_group(title=GROUP_TITLE, description=GROUP_DESCRIPTION)
    for spec in flag_specs():
        group.add_argument(
            spec.option,
            dest=spec.key,
            type=_typed(spec.key),
            choices=spec.choices,
            # SUPPRESS: an absent flag leaves no attribute, so only what the user typed is
            # merged; it also keeps argparse from printing "(default: None)".
            default=argparse.SUPPRESS,
            help=spec.help.replace("%", "%%"),
        )


def given_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The ``kv_*`` flags present on a parsed namespace."""
    return {key: getattr(args, key) for key in FLAT_KEYS if hasattr(args, key)}


def merge_flags(additional_config: Optional[Mapping[str, Any]], flags: Mapping[str, Any]) -> dict[str, Any]:
    """``additional_config`` with ``flags`` applied over its ``kv_eviction`` entry.

    Raises
    ------
    EvictionConfigError
        If the merged policy is invalid (e.g. ``--kv-window`` larger than a token budget).
    """
    base = EvictionConfig.from_additional_config(additional_config)
    config = EvictionConfig.from_flat(flags, base=base)
    return with_config(additional_config, config)


def merge_flags_or_exit(additional_config: Optional[Mapping[str, Any]], flags: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`merge_flags`, with a policy that is invalid as a whole (e.g. ``--kv-budget 64
    --kv-window 100``) reported like any other bad flag: a usage error naming the flags, exit
    status 2, no traceback."""
    try:
        return merge_flags(additional_config, flags)
    except EvictionConfigError as exc:
        named = ", ".join(sorted("--" + k.replace("_", "-") for k in flags))
        sys.stderr.write(f"usage error: the KV eviction flags ({named}) do not fit together: {exc}\n")
        raise SystemExit(2) from None


def add_api_middleware(args: argparse.Namespace, additional_config: Any) -> None:
    """With eviction configured, append the ``vllm_xargs`` JSON-type check to vLLM's own
    ``--middleware`` list of the API server (``vllm serve`` reads the same ``args`` later)."""
    from vllm_kvevict.vllm.api_types import MIDDLEWARE_PATH
    from vllm_kvevict.vllm.startup import wants_eviction

    middleware = getattr(args, "middleware", None)
    if isinstance(middleware, list) and wants_eviction(additional_config) and MIDDLEWARE_PATH not in middleware:
        args.middleware = [*middleware, MIDDLEWARE_PATH]


def normalize_additional_config(additional_config: Any) -> Any:
    """Validate the eviction part of ``additional_config``; return it in nested form.

    Returned unchanged (same object) when it holds no eviction setting, or is not a mapping.

    Raises
    ------
    EvictionConfigError
        Naming the field as given (``kv_eviction.budget`` or ``kv_budget``).
    """
    if not isinstance(additional_config, Mapping) or not any(k in FLAT_KEYS for k in additional_config):
        return additional_config
    config = EvictionConfig.from_additional_config(additional_config)
    return with_config(additional_config, config)


def with_config(additional_config: Optional[Mapping[str, Any]], config: EvictionConfig) -> dict[str, Any]:
    """Copy of ``additional_config`` whose eviction part is ``config`` (dropped if default)."""
    out = {k: v for k, v in (additional_config or {}).items() if k not in FLAT_KEYS}
    nested = config.to_additional_config()[ADDITIONAL_CONFIG_KEY]
    if nested:
        out[ADDITIONAL_CONFIG_KEY] = nested
    return out


def _typed(key: str):
    def parse(text: str) -> Any:
        return parse_flag_value(key, text)

    parse.__name__ = key  # argparse names the type in some messages
    return parse


def _literal_choices(annotation: Any) -> Optional[tuple[str, ...]]:
    """``Literal['a', 'b']`` or ``Optional[Literal[...]]`` -> ``('a', 'b')``; else None."""
    if typing.get_origin(annotation) is typing.Literal:
        return tuple(typing.get_args(annotation))
    for arg in typing.get_args(annotation):
        choices = _literal_choices(arg)
        if choices:
            return choices
    return None
