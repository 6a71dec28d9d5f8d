"""A request's eviction policy, resolved once: when the scheduler admits it.

The API server has already refused invalid ``vllm_xargs`` with an HTTP 400 (:mod:`.api`);
here the request's ``kv_*`` keys are merged over the server's policy, and the result travels
to the worker in the connector metadata (:class:`~vllm_kvevict.vllm.channel.Admission`).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

from vllm_kvevict.config import EvictionConfig

logger = logging.getLogger(__name__)


def resolve_request_policy(extra_args: Optional[Mapping[str, Any]], server_default: EvictionConfig) -> Optional[EvictionConfig]:
    """The request's policy, or ``None`` when it is to be left whole (scorer ``none``, a budget
    that keeps everything, or settings that cannot be valid here: the API server checks them
    first, so this is logged as a fault)."""
    try:
        config = EvictionConfig.from_flat(dict(extra_args or {}), base=server_default)
    except Exception as exc:  # never into the engine core
        logger.warning("kvevict: bad per-request eviction settings, request left whole: %s", exc)
        return None
    return None if config.keeps_everything else config


def extra_args_of(request: Any) -> Optional[Mapping[str, Any]]:
    """``SamplingParams.extra_args`` of a scheduler ``Request`` (``None`` if it has none)."""
    params = getattr(request, "sampling_params", None)
    return getattr(params, "extra_args", None) if params is not None else None
