"""plugin.register(): the vLLM version check and idempotence."""

from __future__ import annotations

import pytest

from vllm_kvevict.vllm import version
from vllm_kvevict.vllm.version import SUPPORTED, UnsupportedVLLMVersion, check_vllm_version, series_of


def test_series_of_release_strings():
    assert series_of("0.32.0") == "0.32"
    assert series_of("0.32.1+cpu") == "0.32"
    assert series_of("v0.26.0rc1") == "0.26"
    assert series_of("unknown") is None


def test_supported_versions_pass_others_are_refused_with_both_named():
    assert check_vllm_version("0.32.0+cpu") == "0.32"
    assert "0.32" in SUPPORTED
    with pytest.raises(UnsupportedVLLMVersion) as info:
        check_vllm_version("0.31.2")
    message = str(info.value)
    assert "installed vLLM 0.31.2" in message
    assert "0.32.x" in message


def test_installed_vllm_is_supported():
    pytest.importorskip("vllm")
    assert check_vllm_version() in SUPPORTED


def test_register_refuses_an_unsupported_vllm(monkeypatch):
    vllm = pytest.importorskip("vllm")
    from vllm_kvevict.vllm import plugin

    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    with pytest.raises(UnsupportedVLLMVersion, match="0.99.0"):
        plugin.register()
    assert plugin._registered is False


def test_register_is_idempotent():
    pytest.importorskip("vllm")
    from vllm.engine.arg_utils import EngineArgs

    from vllm_kvevict.vllm import plugin
    from vllm_kvevict.vllm.patching import original_of

    plugin.register()
    wrapped = EngineArgs.__dict__["from_cli_args"]
    plugin.register()
    plugin._registered = False  # even a second full install wraps only once
    plugin.register()
    assert EngineArgs.__dict__["from_cli_args"] is wrapped
    assert original_of(EngineArgs, "from_cli_args").__func__.__module__ == "vllm.engine.arg_utils"


def test_installed_version_reads_vllm():
    vllm = pytest.importorskip("vllm")
    assert version.installed_vllm_version() == vllm.__version__
