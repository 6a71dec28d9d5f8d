"""HTTP 400 for a ``vllm_xargs`` eviction setting of the wrong JSON type, before vLLM coerces it.

vLLM's request models type ``vllm_xargs`` as ``dict[str, str | int | float | list[...]]``, so
pydantic turns a JSON ``true`` into ``1`` before any check sees it (``"kv_budget": true`` would
silently keep everything). This ASGI middleware reads the raw JSON body of every POST and
refuses a ``kv_*`` value whose JSON type the setting cannot have (a boolean, ``null``, an array
or an object for a number; anything but a string for a choice), naming the field, in vLLM's
error format; every other request passes untouched. It is added through vLLM's own
``--middleware`` list when the server is started with eviction (:mod:`.compat`).
"""

from __future__ import annotations

import json
from typing import Any, Optional

from vllm_kvevict.config import FLAT_KEYS, FLAT_PREFIX, EvictionConfig

MIDDLEWARE_PATH = f"{__name__}.XargsTypeMiddleware"
#: Settings whose values are choices (JSON strings); every other setting is a number.
CHOICE_FIELDS = frozenset(
    {"scorer", "allocation", "granularity", "pooling", "head_selection", "criticalkv_base", "vector", "vector_residual"}
)
#: Largest request body inspected (a bigger one passes through to vLLM's own limits).
MAX_BODY = 64 << 20


def wrong_type(xargs: Any) -> Optional[tuple[str, str]]:
    """``(key, message)`` of the first ``kv_*`` entry of a JSON ``vllm_xargs`` object whose JSON
    type its setting cannot have; ``None`` if there is none (or ``xargs`` is not an object:
    vLLM's own validation answers that)."""
    if not isinstance(xargs, dict):
        return None
    for key, value in xargs.items():
        if not (isinstance(key, str) and key.startswith(FLAT_PREFIX)) or key not in FLAT_KEYS:
            continue  # not ours, or an unknown kv_ key (the policy check names it)
        field = FLAT_KEYS[key]
        if field in CHOICE_FIELDS:
            if not isinstance(value, str):
                return key, f"invalid {key}={json.dumps(value)}: a string, one of the allowed names"
        elif isinstance(value, bool) or not isinstance(value, (int, float, str)):
            kind = "a boolean" if isinstance(value, bool) else f"JSON {type(value).__name__}"
            return key, f"invalid {key}={json.dumps(value)}: a number, not {kind}"
    return None


class XargsTypeMiddleware:
    """Pure ASGI middleware (see the module docstring)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        received, size, more = [], 0, True
        while more and size <= MAX_BODY:
            message = await receive()
            received.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        if received[-1]["type"] == "http.request" and not more:
            problem = _problem(b"".join(m.get("body", b"") for m in received))
            if problem is not None:
                return await _bad_request(send, *problem)
        return await self.app(scope, _replay(received, receive), send)


def _problem(body: bytes) -> Optional[tuple[str, str]]:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(payload, dict):
        return None
    problem = wrong_type(payload.get("vllm_xargs"))
    if problem is not None:
        from vllm_kvevict.vllm.metrics import record_rejected

        xargs = payload["vllm_xargs"]
        scorer = xargs.get("kv_eviction") if isinstance(xargs.get("kv_eviction"), str) else EvictionConfig().scorer
        granularity = xargs.get("kv_granularity") if isinstance(xargs.get("kv_granularity"), str) else "other"
        record_rejected(str(scorer), str(granularity))
    return problem


def _replay(messages: list, then):
    """An ASGI ``receive`` that yields ``messages`` again, then defers to ``then``."""
    pending = list(messages)

    async def receive():
        return pending.pop(0) if pending else await then()

    return receive


async def _bad_request(send, key: str, message: str) -> None:
    body = json.dumps({"error": {"message": f"vllm_xargs: {message}", "type": "BadRequestError", "param": key,
                                 "code": 400}}).encode()
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
