"""Entry point of the ``vllm.general_plugins`` group (``kvevict``, declared in setup.py).

vLLM calls :func:`register` in the API server (from ``AsyncEngineArgs.add_cli_args``, just
before the ``vllm serve`` parser is built), in ``EngineArgs.__post_init__`` (offline ``LLM``),
in the engine core and in every worker, possibly several times per process. Nothing here
changes how vLLM runs: the hooks only add flags and validation, and eviction acts only when
``additional_config`` asks for it (which brings our KV connector, the channel without which no
row is ever scored or compacted; the backend is then vLLM's CPU backend with the same metadata
and kernel calls).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

_registered = False


def register() -> None:
    """Check the vLLM version, then install the hooks of its compat module (idempotent).

    Raises :class:`~vllm_kvevict.vllm.version.UnsupportedVLLMVersion` on a vLLM this plugin does
    not support (vLLM does not catch it: the process stops with its message).
    """
    global _registered
    if _registered:
        return
    from vllm_kvevict.vllm.compat import active
    from vllm_kvevict.vllm.version import check_vllm_version

    series = check_vllm_version()
    active().install_all()
    _registered = True
    logger.debug("vllm-kvevict registered for vLLM %s", series)
