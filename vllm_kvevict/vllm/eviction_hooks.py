"""Install page eviction into vLLM: connector auto-config, backend, scheduler and worker hooks.

Called by :func:`vllm_kvevict.vllm.plugin.register` in every vLLM process. Everything it
installs is inert unless ``additional_config`` configures ``kv_eviction`` (which brings our KV
connector, the channel without which no row is ever scored or compacted): the backend then is
vLLM's CPU backend with the same metadata and kernel calls.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

logger = logging.getLogger(__name__)

_installed = False


def install(vllm_config: Optional[Any] = None) -> None:
    """Install the hooks of the installed vLLM series (idempotent).

    ``vllm_config``: when given (a ``VllmConfig`` being built), our KV connector is set on it if
    its ``additional_config`` asks for eviction.
    """
    global _installed
    if not _installed:
        from vllm_kvevict.vllm.version import check_vllm_version

        series = check_vllm_version()
        if series == "0.32":
            from vllm_kvevict.vllm.compat import v0_32 as compat
        else:  # pragma: no cover - check_vllm_version only returns supported series
            raise RuntimeError(f"no eviction hooks for vLLM {series}")
        compat.install_all()
        _installed = True
    if vllm_config is not None:
        from vllm_kvevict.vllm.compat import v0_32

        v0_32.ensure_connector(vllm_config)
