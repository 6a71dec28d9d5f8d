"""Per-request vllm_xargs: validated in the front-end; a bad value is a VLLMValidationError (HTTP 400)."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest

from vllm_kvevict.config import EvictionConfig, EvictionConfigError
from vllm_kvevict.vllm import api

pytest.importorskip("vllm")

SNAPKV_SERVER = EvictionConfig.from_fields(scorer="snapkv", budget=1)


@pytest.fixture(scope="module")
def plugin():
    from vllm_kvevict.vllm import plugin

    plugin.register()
    return plugin


@pytest.mark.parametrize(
    "xargs, field",
    [
        ({"kv_eviction": "snap"}, "kv_eviction"),
        ({"kv_budget": 1.5}, "kv_budget"),
        ({"kv_budget": 0}, "kv_budget"),
        ({"kv_budget": "lots"}, "kv_budget"),
        ({"kv_window": [1, 2]}, "kv_window"),
        ({"kv_window": "wide"}, "kv_window"),
        ({"kv_buget": 0.2}, "kv_buget"),
        ({"kv_budget": 16}, "kv_window"),  # the server's window of 32 does not fit 16 tokens
    ],
)
def test_bad_request_values_name_the_field(xargs, field):
    with pytest.raises(EvictionConfigError) as info:
        api.request_config(xargs, SNAPKV_SERVER)
    assert info.value.field == field


def test_request_overrides_server_default_and_other_keys_pass():
    config = api.request_config({"kv_eviction": "tova", "kv_budget": "0.2", "session_id": "x"}, SNAPKV_SERVER)
    assert (config.scorer, config.budget, config.resolved_allocation) == ("tova", 0.2, "uniform")
    assert api.request_config({"session_id": "x", "other": [1]}, SNAPKV_SERVER) is SNAPKV_SERVER
    assert api.request_config(None, SNAPKV_SERVER) is SNAPKV_SERVER
    assert not api.request_config({"kv_eviction": "none"}, SNAPKV_SERVER).enabled


def test_what_only_the_block_size_decides_is_checked_with_it():
    xargs = {"kv_eviction": "criticalkv", "kv_budget": 0.2, "kv_decode_interval": 64}
    assert api.request_config(xargs, SNAPKV_SERVER, block_size=16).scorer == "criticalkv"
    with pytest.raises(EvictionConfigError, match="block size is 128") as info:
        api.request_config(xargs, SNAPKV_SERVER, block_size=128)
    assert info.value.field == "kv_decode_interval"


def test_policy_on_a_server_without_eviction_is_refused():
    with pytest.raises(EvictionConfigError) as info:
        api.request_config({"kv_eviction": "snapkv"}, EvictionConfig())
    assert info.value.field == "kv_eviction"
    assert "--kv-eviction=none" in str(info.value)
    assert not api.request_config({"kv_eviction": "none", "kv_budget": 0.5}, EvictionConfig()).enabled


def test_server_default_reads_additional_config():
    assert api.server_default({}) == EvictionConfig()
    assert api.server_default(None) == EvictionConfig()
    assert api.server_default(SNAPKV_SERVER.to_additional_config()) == SNAPKV_SERVER


def test_check_request_raises_vllm_validation_error_with_param():
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    vllm_config = SimpleNamespace(additional_config=SNAPKV_SERVER.to_additional_config())
    api.check_request(SamplingParams(extra_args={"kv_budget": 0.2}), vllm_config)
    api.check_request(SamplingParams(), vllm_config)
    with pytest.raises(VLLMValidationError) as info:
        api.check_request(SamplingParams(extra_args={"kv_budget": 2.5}), vllm_config)
    assert info.value.parameter == "kv_budget"
    assert "kv_budget=2.5" in str(info.value)


def test_hooks_sit_on_the_expected_vllm_functions(plugin):
    """Fails if vLLM 0.32 moved or reshaped what compat.v0_32.patch_request_validation() wraps."""
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.input_processor import InputProcessor

    from vllm_kvevict.vllm.patching import is_wrapped, original_of

    assert is_wrapped(InputProcessor, "_validate_params")
    assert is_wrapped(AsyncLLM, "generate")
    assert list(inspect.signature(original_of(InputProcessor, "_validate_params")).parameters)[:2] == ["self", "params"]
    generate = original_of(AsyncLLM, "generate")
    assert inspect.isasyncgenfunction(generate)  # why the eager wrapper is needed
    assert list(inspect.signature(generate).parameters)[:3] == ["self", "prompt", "sampling_params"]


def test_generate_checks_before_the_stream_starts(plugin):
    """AsyncLLM.generate raises when called (before any response is sent), not when iterated."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.async_llm import AsyncLLM

    fake_llm = SimpleNamespace(vllm_config=SimpleNamespace(additional_config=SNAPKV_SERVER.to_additional_config()))
    with pytest.raises(VLLMValidationError) as info:
        AsyncLLM.generate(fake_llm, "hi", SamplingParams(extra_args={"kv_eviction": "bogus"}), "req-1")
    assert info.value.parameter == "kv_eviction"
    stream = AsyncLLM.generate(fake_llm, "hi", SamplingParams(extra_args={"kv_budget": 0.3}), "req-2")
    assert inspect.isasyncgen(stream)  # valid: the untouched generator, not yet started
    stream.aclose().close()


def test_input_processor_rejects_bad_xargs(plugin, tiny_llama_dir):
    """The real InputProcessor (front-end of AsyncLLM and of the offline LLMEngine)."""
    from vllm import SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    vllm_config = EngineArgs(
        model=str(tiny_llama_dir), dtype="float32", max_model_len=256, additional_config={"kv_eviction": "snapkv", "kv_budget": 1}
    ).create_engine_config()
    assert vllm_config.additional_config == {"kv_eviction": {"scorer": "snapkv"}}  # budget 1 is the default
    processor = InputProcessor(vllm_config)
    prompt = {"type": "token", "prompt_token_ids": [1, 2, 3]}
    with pytest.raises(VLLMValidationError) as info:
        processor.process_inputs("r1", prompt, SamplingParams(extra_args={"kv_sinks": -1}), supported_tasks=("generate",))
    assert info.value.parameter == "kv_sinks"
    request = processor.process_inputs(
        "r2", prompt, SamplingParams(extra_args={"kv_budget": 0.5, "x": 1}), supported_tasks=("generate",)
    )
    assert request.sampling_params.extra_args == {"kv_budget": 0.5, "x": 1}


def test_a_request_is_checked_once_through_both_hooks(monkeypatch):
    """AsyncLLM.generate checks (and remembers) the params; _validate_params does not parse again."""
    from vllm import SamplingParams

    calls = []
    real = api.request_config
    monkeypatch.setattr(api, "request_config", lambda *a: calls.append(1) or real(*a))
    vllm_config = SimpleNamespace(additional_config=SNAPKV_SERVER.to_additional_config())
    params = SamplingParams(extra_args={"kv_budget": 0.3})
    api.check_request(params, vllm_config, remember=True)
    api.check_request(params, vllm_config)
    assert calls == [1]
    api.check_request(params, vllm_config)  # a third check (not from the hooks) parses again
    assert calls == [1, 1]


STRICT = EvictionConfig.from_flat({"kv_eviction": "criticalkv", "kv_budget": 0.2, "kv_request_override": "stricter"})


@pytest.mark.parametrize("xargs,field", [
    ({"kv_eviction": "none"}, "kv_eviction"),
    ({"kv_budget": 1}, "kv_budget"),
    ({"kv_budget": 0.5}, "kv_budget"),
    ({"kv_budget": 256}, "kv_budget"),
    ({"kv_eviction": "snapkv"}, "kv_eviction"),
    ({"kv_allocation": "uniform"}, "kv_allocation"),
    ({"kv_granularity": "page"}, "kv_granularity"),
    ({"kv_window": 64}, "kv_window"),
    ({"kv_min_tokens": STRICT.min_tokens + 1}, "kv_min_tokens"),
    ({"kv_request_override": "any"}, "kv_request_override"),
])
def test_stricter_refuses_what_would_hold_more_naming_the_field(xargs, field):
    with pytest.raises(EvictionConfigError) as info:
        api.request_config(xargs, STRICT)
    assert info.value.field == field and ("stricter" in str(info.value) or "server setting" in str(info.value))


def test_stricter_lets_a_request_hold_less_and_tune_scoring():
    assert api.request_config({"kv_budget": 0.1}, STRICT).budget == 0.1
    assert api.request_config({"kv_rho": 0.3, "kv_window": 16}, STRICT).rho == 0.3
    assert api.request_config({"kv_min_tokens": 0}, STRICT).min_tokens == 0  # a lower floor holds less
    floored = STRICT.model_copy(update={"min_tokens": 128})
    assert api.request_config({"kv_min_tokens": 128}, floored).min_tokens == 128
    assert api.request_config({"kv_min_tokens": 64, "kv_budget": 0.1}, floored).budget_tokens(900) == 90
    tokens = EvictionConfig.from_flat({"kv_eviction": "criticalkv", "kv_budget": 256, "kv_min_tokens": 0,
                                       "kv_request_override": "stricter"})
    assert api.request_config({"kv_budget": 128}, tokens).budget_tokens(900) == 128  # the floor is not read
    assert api.request_config({"other_plugin": 1}, STRICT) is STRICT


def test_none_lets_no_request_change_the_policy_and_any_is_the_default():
    locked = EvictionConfig.from_flat({"kv_eviction": "snapkv", "kv_budget": 0.2, "kv_request_override": "none"})
    with pytest.raises(EvictionConfigError, match="kv_budget.*lets no request change"):
        api.request_config({"kv_budget": 0.1}, locked)
    assert EvictionConfig().request_override == "any"
    assert api.request_config({"kv_eviction": "none"}, SNAPKV_SERVER).scorer == "none"
