"""At startup eviction configures our connector, switches Model Runner V2 off, or refuses with
one message naming what is not supported and what is."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_kvevict.vllm.startup import UnsupportedEvictionSetup, configure_eviction, unsupported_reasons

EVICTION = {"kv_eviction": {"scorer": "snapkv", "budget": 0.2}}


def _config(**changes):
    parallel = SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1, decode_context_parallel_size=1,
                               data_parallel_size=1, prefill_context_parallel_size=1)
    model = SimpleNamespace(get_sliding_window=lambda: None, is_hybrid=False, is_encoder_decoder=False,
                            attention_chunk_size=None)
    config = SimpleNamespace(additional_config=EVICTION, kv_transfer_config=None, parallel_config=parallel,
                             speculative_config=None, cache_config=SimpleNamespace(cache_dtype="auto"),
                             model_config=model)
    for key, value in changes.items():
        target, _, attr = key.partition("__")
        if attr:
            setattr(getattr(config, target), attr, value)
        else:
            setattr(config, key, value)
    return config


def test_a_supported_setup_gets_our_connector_and_nothing_else_does():
    from vllm_kvevict.vllm.connector import CONNECTOR_MODULE, CONNECTOR_NAME

    plain = _config(additional_config={})
    assert not configure_eviction(plain) and plain.kv_transfer_config is None
    asked = _config()
    assert unsupported_reasons(asked) == [] and configure_eviction(asked)
    ktc = asked.kv_transfer_config
    assert (ktc.kv_connector, ktc.kv_connector_module_path, ktc.kv_role) == (CONNECTOR_NAME, CONNECTOR_MODULE, "kv_both")


@pytest.mark.parametrize("change,named", [
    ({"parallel_config__tensor_parallel_size": 2}, "tensor_parallel_size=2"),
    ({"parallel_config__pipeline_parallel_size": 2}, "pipeline_parallel_size=2"),
    ({"parallel_config__decode_context_parallel_size": 2}, "decode_context_parallel_size=2"),
    ({"speculative_config": object()}, "speculative decoding"),
    ({"cache_config__cache_dtype": "fp8"}, "KV cache dtype fp8"),
    ({"model_config__get_sliding_window": lambda: 4096}, "sliding-window attention"),
    ({"model_config__is_hybrid": True}, "hybrid"),
    ({"model_config__is_encoder_decoder": True}, "encoder-decoder"),
])
def test_unsupported_setups_are_refused_naming_the_reason_and_what_is_supported(change, named):
    with pytest.raises(UnsupportedEvictionSetup) as err:
        configure_eviction(_config(**change))
    assert named in str(err.value) and "vllm-kvevict supports: vLLM-CPU" in str(err.value)


def test_another_kv_connector_is_refused_not_silently_ignored():
    from vllm.config import KVTransferConfig

    other = _config(kv_transfer_config=KVTransferConfig(kv_connector="OffloadingConnector", kv_role="kv_both"))
    with pytest.raises(UnsupportedEvictionSetup, match="the KV connector OffloadingConnector"):
        configure_eviction(other)


def test_model_runner_v2_is_off_when_eviction_is_configured(monkeypatch):
    """vLLM then picks Model Runner V1 with its own log line, or refuses V2 forced by env."""
    from vllm.config.vllm import VllmConfig

    from vllm_kvevict.vllm.compat import v0_32

    v0_32.install_all()
    fake = SimpleNamespace(additional_config=EVICTION, speculative_config=None,
                           parallel_config=SimpleNamespace(distributed_executor_backend="mp",
                                                           pipeline_parallel_size=1, use_ubatching=False))
    assert v0_32.EVICTION_FEATURE in VllmConfig._get_v2_model_runner_unsupported_features(fake)
    fake.additional_config = {}
    assert v0_32.EVICTION_FEATURE not in VllmConfig._get_v2_model_runner_unsupported_features(fake)


def test_a_policy_only_the_block_size_refuses_is_refused_at_startup():
    """criticalkv's decode-time eviction at head granularity needs whole pages per head: refused
    with the block size that picks single tokens, started with one that picks pages."""
    policy = {"kv_eviction": {"scorer": "criticalkv", "budget": 0.2, "decode_interval": 64}}
    with pytest.raises(UnsupportedEvictionSetup) as err:
        configure_eviction(_config(additional_config=policy, cache_config__block_size=128))
    assert "at block size 128" in str(err.value) and "whole pages per head" in str(err.value)
    assert unsupported_reasons(_config(additional_config=policy, cache_config__block_size=32)) == []
    assert unsupported_reasons(_config(additional_config=EVICTION, cache_config__block_size=128)) == []
