"""The ``vllm_xargs`` JSON-type check: a boolean (or any wrong JSON type) for a setting is a 400
naming it, before vLLM's request model would coerce it; everything else passes untouched."""

from __future__ import annotations

import asyncio
import json

import pytest

from vllm_kvevict.vllm.api_types import XargsTypeMiddleware, wrong_type


@pytest.mark.parametrize("xargs,key", [
    ({"kv_budget": True}, "kv_budget"),
    ({"kv_window": True}, "kv_window"),
    ({"kv_min_tokens": True}, "kv_min_tokens"),
    ({"kv_min_tokens": [128]}, "kv_min_tokens"),
    ({"kv_budget": None}, "kv_budget"),
    ({"kv_sinks": [1]}, "kv_sinks"),
    ({"kv_alpha": {"x": 1}}, "kv_alpha"),
    ({"kv_eviction": 3}, "kv_eviction"),
    ({"kv_granularity": False}, "kv_granularity"),
])
def test_wrong_json_types_are_named(xargs, key):
    found = wrong_type(xargs)
    assert found is not None and found[0] == key


@pytest.mark.parametrize("xargs", [
    {"kv_budget": 0.2, "kv_window": 16, "kv_eviction": "snapkv"},
    {"kv_budget": "0.2"},  # numbers as text are read as numbers by the policy check
    {"my_flag": True, "other": None},  # not ours
    {"kv_bogus": True},  # unknown: the policy check names it
    "not an object",
    None,
])
def test_everything_else_passes(xargs):
    assert wrong_type(xargs) is None


def _call(body: bytes, chunks: int = 1):
    """Run the middleware over one POST; returns (what the app received, what was sent back)."""
    seen, sent = {}, []

    async def app(scope, receive, send):
        parts = []
        while True:
            message = await receive()
            parts.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        seen["body"] = b"".join(parts)
        await send({"type": "http.response.start", "status": 200, "headers": []})

    pieces = [body[i * len(body) // chunks:(i + 1) * len(body) // chunks] for i in range(chunks)]
    messages = [{"type": "http.request", "body": p, "more_body": i < len(pieces) - 1} for i, p in enumerate(pieces)]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(XargsTypeMiddleware(app)({"type": "http", "method": "POST"}, receive, send))
    return seen.get("body"), sent


def test_a_boolean_budget_is_answered_400_in_vllms_error_format():
    app_body, sent = _call(json.dumps({"prompt": "x", "vllm_xargs": {"kv_budget": True}}).encode())
    assert app_body is None  # never reached vLLM
    assert sent[0]["status"] == 400
    error = json.loads(sent[1]["body"])["error"]
    assert error["param"] == "kv_budget" and "not a boolean" in error["message"] and error["code"] == 400


def test_a_valid_body_reaches_the_app_byte_for_byte_even_in_chunks():
    body = json.dumps({"prompt": "x" * 1000, "vllm_xargs": {"kv_budget": 0.2}}).encode()
    for chunks in (1, 3):
        app_body, sent = _call(body, chunks)
        assert app_body == body and sent[0]["status"] == 200
    garbage = b"{not json"
    assert _call(garbage)[0] == garbage  # vLLM answers malformed JSON itself
