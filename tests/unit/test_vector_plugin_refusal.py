"""VECTOR is served by the reference engine only for now: the plugin refuses it, never ignores it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_kvevict.config import EvictionConfig, EvictionConfigError
from vllm_kvevict.vllm import api, cli
from vllm_kvevict.vllm.api_types import wrong_type
from vllm_kvevict.vllm.request_policy import resolve_request_policy

SERVER = EvictionConfig.from_fields(scorer="keydiff", budget=1)


def test_flags_with_vector_on_are_a_usage_error_naming_the_flag(capsys):
    flags = {"kv_eviction": "keydiff", "kv_budget": 0.1, "kv_vector": "on"}
    with pytest.raises(SystemExit) as info:
        cli.merge_flags_or_exit({}, flags)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage error" in err and "--kv-vector" in err and "reference engine only" in err
    assert cli.merge_flags({}, {**flags, "kv_vector": "off"})["kv_eviction"]["scorer"] == "keydiff"


def test_vector_flags_are_checked_alone_then_refused_together(capsys):
    assert cli.parse_flag_value("kv_vector_share", "0.05") == 0.05
    assert cli.parse_flag_value("kv_vector", "on") == "on"
    with pytest.raises(SystemExit):
        cli.merge_flags_or_exit({}, {"kv_eviction": "keydiff", "kv_vector_share": 0.05})  # needs --kv-vector on
    assert "kv_vector_share" in capsys.readouterr().err


@pytest.mark.parametrize("given, field", [
    ({"kv_eviction": {"scorer": "keydiff", "budget": 0.1, "vector": "on"}}, "kv_eviction.vector"),
    ({"kv_eviction": "keydiff", "kv_budget": 0.1, "kv_vector": "on"}, "kv_vector"),
])
def test_additional_config_with_vector_on_fails_at_start(given, field):
    with pytest.raises(EvictionConfigError) as info:
        cli.normalize_additional_config(given)
    assert info.value.field == field
    assert "reference engine only" in str(info.value)


def test_a_request_with_vector_on_is_refused_naming_kv_vector():
    with pytest.raises(EvictionConfigError) as info:
        api.request_config({"kv_vector": "on", "kv_budget": 0.1}, SERVER)
    assert info.value.field == "kv_vector"
    assert "reference engine only" in str(info.value)
    assert api.request_config({"kv_vector": "off", "kv_budget": 0.1}, SERVER).vector == "off"
    # the scheduler never serves it either (it would have been a 400 first): left whole
    assert resolve_request_policy({"kv_vector": "on", "kv_budget": 0.1}, SERVER) is None


def test_a_json_boolean_for_kv_vector_is_refused_before_vllm_coerces_it():
    assert wrong_type({"kv_vector": True})[0] == "kv_vector"
    assert wrong_type({"kv_vector": "on", "kv_vector_share": 0.05}) is None


def test_check_request_answers_http_400_with_param_kv_vector():
    pytest.importorskip("vllm")
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    vllm_config = SimpleNamespace(additional_config=SERVER.to_additional_config())
    with pytest.raises(VLLMValidationError) as info:
        api.check_request(SamplingParams(extra_args={"kv_vector": "on", "kv_budget": 0.1}), vllm_config)
    assert info.value.parameter == "kv_vector"
