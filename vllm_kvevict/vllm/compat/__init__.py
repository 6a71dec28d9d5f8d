"""Version-specific hooks into vLLM, one module per supported vLLM series (``v0_32`` ...).

Each module exposes ``PATCH_TARGETS`` (every vLLM symbol it patches, for the tests that fail
loudly when vLLM moves one), ``install_all()``, the runner-batch reader and the block-list
helpers the scheduler side uses. :func:`active` is the module of the installed vLLM.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType


@functools.lru_cache(maxsize=None)
def active() -> ModuleType:
    """The compat module of the installed vLLM (raises ``UnsupportedVLLMVersion`` otherwise)."""
    from vllm_kvevict.vllm.version import check_vllm_version

    return module_for(check_vllm_version())


def module_for(series: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.v{series.replace('.', '_')}")
