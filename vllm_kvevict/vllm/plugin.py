"""Entry point of the ``vllm.general_plugins`` group (``kvevict``, declared in setup.py).

vLLM calls :func:`register` in the API server (from ``AsyncEngineArgs.add_cli_args``, just
before the ``vllm serve`` parser is built), in ``EngineArgs.__post_init__`` (offline ``LLM``),
in the engine core and in every worker, possibly several times per process. Nothing here
changes how vLLM runs: the patches only add flags and validation, and the eviction hooks act
only for a policy other than ``none``.
"""

from __future__ import annotations

import logging

from vllm_kvevict.vllm.version import check_vllm_version

logger = logging.getLogger(__name__)

_registered = False


def register() -> None:
    """Check the vLLM version, then install flags, API validation, metrics and eviction hooks.

    Idempotent. Raises :class:`~vllm_kvevict.vllm.version.UnsupportedVLLMVersion` on a vLLM
    this plugin does not support (vLLM does not catch it: the process stops with its message).
    """
    global _registered
    if _registered:
        return
    series = check_vllm_version()

    from vllm_kvevict.vllm import api, cli, eviction_hooks

    cli.install()
    api.install()
    # Metrics need no install: they ride on the KV connector's stats (see metrics.py).
    eviction_hooks.install()
    _registered = True
    logger.debug("vllm-kvevict registered for vLLM %s", series)
