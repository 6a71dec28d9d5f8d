"""Settings the reference engine serves and the plugin does not yet: refused, never ignored.

``vector`` on (VECTOR's key-only route) needs key-only head-pages in vLLM's KV cache and
attention that rebuilds their values (the second half of issue 19, docs/VECTOR.md); until they
exist a server started with it is a usage error (``--kv-vector``) and a request naming it an
HTTP 400 (``kv_vector``).
"""

from __future__ import annotations

from typing import Callable

from vllm_kvevict.config import FIELD_TO_FLAT, EvictionConfig, EvictionConfigError

#: field -> (the value the plugin cannot serve, why).
REFERENCE_ONLY: dict[str, tuple[str, str]] = {
    "vector": (
        "on",
        "'off' here: --kv-vector / kv_vector (VECTOR's key-only route) is served by the reference engine only "
        "for now (vllm_kvevict.reference; key-only head-pages in vLLM are not implemented yet, docs/VECTOR.md)",
    ),
}


def check_served(config: EvictionConfig, naming: Callable[[str], str] = lambda f: FIELD_TO_FLAT.get(f, f)) -> None:
    """Raise :class:`EvictionConfigError` (the field named by ``naming``) for a setting of
    :data:`REFERENCE_ONLY`."""
    for name, (value, why) in REFERENCE_ONLY.items():
        if getattr(config, name) == value:
            raise EvictionConfigError(naming(name), value, why)
