"""Per-request policy (``vllm_xargs``) validated in the process that accepts the request.

``extra_body={"vllm_xargs": {"kv_eviction": "snapkv", "kv_budget": 0.2}}`` becomes
``SamplingParams.extra_args``; :func:`check_request` builds the request's policy with
``EvictionConfig.from_flat(extra_args, base=server_default)`` and raises
``VLLMValidationError(parameter=<the key>)``, which vLLM's API server answers with HTTP 400
(``{"error": {"message": ..., "param": "kv_budget"}}``). A bad value therefore never reaches
the engine core. Keys that do not start with ``kv_`` belong to others and pass through.

A server started with ``--kv-eviction=none`` runs stock vLLM (no eviction machinery), so a
request naming another policy there is refused; start the server with a policy and
``--kv-budget=1`` (keep everything) to let requests opt in.

Hooks (:func:`vllm_kvevict.vllm.compat.v0_32.patch_request_validation`): vLLM's
``InputProcessor._validate_params`` (every request of ``AsyncLLM`` and of the offline engine)
and ``AsyncLLM.generate`` (whose body first runs after a streaming response has started with
HTTP 200, so it is checked when called). A request passes both; it is validated once: the
second check finds it in :data:`_CHECKED`.
"""

from __future__ import annotations

import collections
import functools
import json
from typing import Any, Mapping, Optional

from vllm_kvevict.config import FIELD_TO_FLAT, FLAT_KEYS, FLAT_PREFIX, SERVER_ONLY, EvictionConfig, EvictionConfigError

DISABLED_SERVER_HINT = (
    "this server runs without KV eviction (--kv-eviction=none); start it with a policy, e.g. "
    "--kv-eviction=snapkv --kv-budget=1 (keeps everything unless a request asks), to choose "
    "one per request"
)


def request_config(extra_args: Optional[Mapping[str, Any]], server_default: EvictionConfig,
                   block_size: Optional[int] = None) -> EvictionConfig:
    """The policy of one request: its ``kv_*`` keys over the server default, within what the
    server's ``--kv-request-override`` lets a request change (``block_size``: the KV cache's,
    for what only it decides, :meth:`EvictionConfig.check_block_size`).

    Raises
    ------
    EvictionConfigError
        Naming the request's key (``kv_budget``, ``kv_eviction``...).
    """
    if not has_eviction_keys(extra_args):
        return server_default
    for key in extra_args:
        if FLAT_KEYS.get(key) in SERVER_ONLY:
            raise EvictionConfigError(key, extra_args[key], "a server setting (--" + key.replace("_", "-") +
                                      "), not one a request may set")
    mode = server_default.request_override
    if mode == "none":
        key = next(k for k in extra_args if str(k).startswith(FLAT_PREFIX))
        raise EvictionConfigError(key, extra_args[key], "this server lets no request change its eviction policy "
                                  "(--kv-request-override none)")
    config = EvictionConfig.from_flat(extra_args, base=server_default)
    if block_size:
        config.check_block_size(block_size, naming=lambda f: FIELD_TO_FLAT.get(f, f))
    if config.enabled and not server_default.enabled:
        raise EvictionConfigError("kv_eviction", config.scorer, DISABLED_SERVER_HINT)
    if mode == "stricter":
        check_stricter(config, server_default, extra_args)
    return config


def check_stricter(config: EvictionConfig, server: EvictionConfig, extra_args: Mapping[str, Any]) -> None:
    """Under ``--kv-request-override stricter`` a request may only hold less: the server's
    scorer, allocation and granularity, a budget of the same kind no larger than the server's,
    no larger window or sinks (they set the budget's floor), no larger ``min_tokens`` (the
    floor of a fractional budget), the prompt evicted if the server evicts it, decode-time
    eviction no rarer than the server's; scoring settings are free."""

    def refuse(key: str, value: Any, why: str) -> None:
        raise EvictionConfigError(key, value, f"{why} (--kv-request-override stricter)")

    for key, ours, theirs in (("kv_eviction", config.scorer, server.scorer),
                              ("kv_allocation", config.resolved_allocation, server.resolved_allocation),
                              ("kv_granularity", config.resolved_granularity, server.resolved_granularity)):
        if ours != theirs:
            refuse(key, extra_args.get(key, ours), f"only the server's {theirs!r} here")
    if config.keeps_everything and not server.keeps_everything or config.is_token_budget != server.is_token_budget:
        refuse("kv_budget", extra_args.get("kv_budget", config.budget),
               f"a budget of the server's kind no larger than its {server.budget}")
    if not config.keeps_everything and config.budget > server.budget:
        refuse("kv_budget", extra_args.get("kv_budget", config.budget), f"at most the server's {server.budget}")
    limits = [("kv_window", config.window, server.window), ("kv_sinks", config.resolved_sinks, server.resolved_sinks)]
    if not config.is_token_budget:  # a token budget does not read the floor
        limits.append(("kv_min_tokens", config.min_tokens, server.min_tokens))
    for key, ours, theirs in limits:
        if ours > theirs:
            refuse(key, extra_args.get(key, ours), f"at most the server's {theirs}")
    if config.prompt_eviction == "off" and server.prompt_eviction == "on":
        refuse("kv_prompt_eviction", extra_args.get("kv_prompt_eviction", "off"), "only the server's 'on' here")
    if server.decode_interval and not 0 < config.decode_interval <= server.decode_interval:
        refuse("kv_decode_interval", extra_args.get("kv_decode_interval", config.decode_interval),
               f"between 1 and the server's {server.decode_interval}")


def has_eviction_keys(extra_args: Optional[Mapping[str, Any]]) -> bool:
    return bool(extra_args) and any(str(k).startswith(FLAT_PREFIX) for k in extra_args)


def server_default(additional_config: Any) -> EvictionConfig:
    """The server's policy from vLLM's ``additional_config`` (validated at engine start)."""
    if not isinstance(additional_config, Mapping):
        return EvictionConfig()
    return _server_default_cached(json.dumps(additional_config, sort_keys=True, default=str))


@functools.lru_cache(maxsize=8)
def _server_default_cached(additional_config_json: str) -> EvictionConfig:
    return EvictionConfig.from_additional_config(json.loads(additional_config_json))


#: Sampling params already checked by the first of the two hooks (by identity; bounded: a
#: request that never reaches the second hook, e.g. aborted first, ages out).
_CHECKED: "collections.OrderedDict[int, Any]" = collections.OrderedDict()
_CHECKED_MAX = 4096


def check_request(params: Any, vllm_config: Any, remember: bool = False) -> None:
    """Raise ``VLLMValidationError`` (HTTP 400) if ``params.extra_args`` holds a bad policy.

    ``remember``: the first of the two hooks (``AsyncLLM.generate``) keeps the params, so that
    the second (``_validate_params``) does not check them again."""
    extra_args = getattr(params, "extra_args", None)
    if not isinstance(extra_args, Mapping) or not has_eviction_keys(extra_args):
        return
    if _CHECKED.get(id(params)) is params:
        del _CHECKED[id(params)]
        return
    from vllm.exceptions import VLLMValidationError

    default = server_default(vllm_config.additional_config)
    try:
        request_config(extra_args, default, getattr(getattr(vllm_config, "cache_config", None), "block_size", None))
    except EvictionConfigError as exc:
        from vllm_kvevict.vllm.metrics import record_rejected

        granularity = extra_args.get("kv_granularity", getattr(default, "resolved_granularity", "page"))
        record_rejected(str(extra_args.get("kv_eviction", default.scorer)), str(granularity))
        raise VLLMValidationError(f"vllm_xargs: {exc}", parameter=exc.field) from None
    if not remember:
        return
    _CHECKED[id(params)] = params
    while len(_CHECKED) > _CHECKED_MAX:
        _CHECKED.popitem(last=False)
