"""Settings the plugin serves on some platforms only: refused elsewhere, never ignored.

``vector`` on (VECTOR's key-only route) is served on vLLM-CPU: key-only head-pages are copied
by compaction and attended by the torch two-segment path, which rebuilds their values
(docs/VECTOR.md). The CUDA backends do not carry key-only pages to their Triton kernel yet
(the kernel reads them: :mod:`vllm_kvevict.kernels.key_only_decode`), so on any other
platform a server started with it is a usage error (``--kv-vector``) and a request naming it
an HTTP 400 (``kv_vector``).
"""

from __future__ import annotations

from typing import Any, Callable

from vllm_kvevict.config import FIELD_TO_FLAT, EvictionConfig, EvictionConfigError

#: field -> (the value served on vLLM-CPU only, why elsewhere).
CPU_ONLY: dict[str, tuple[str, str]] = {
    "vector": (
        "on",
        "'off' here: --kv-vector / kv_vector (VECTOR's key-only route) is served on vLLM-CPU only for now "
        "(the CUDA backends do not attend key-only head-pages yet, docs/VECTOR.md); the reference "
        "engine (vllm_kvevict.reference) serves it anywhere",
    ),
}


def platform_is_cpu(platform: Any = None) -> bool:
    """Whether ``platform`` (vLLM's ``current_platform`` unless given) is vLLM-CPU."""
    if platform is None:
        from vllm.platforms import current_platform

        platform = current_platform
    return bool(platform.is_cpu())


def check_served(config: EvictionConfig, naming: Callable[[str], str] = lambda f: FIELD_TO_FLAT.get(f, f),
                 platform: Any = None) -> None:
    """Raise :class:`EvictionConfigError` (the field named by ``naming``) for a setting of
    :data:`CPU_ONLY` on a platform other than vLLM-CPU."""
    for name, (value, why) in CPU_ONLY.items():
        if getattr(config, name) == value and not platform_is_cpu(platform):
            raise EvictionConfigError(naming(name), value, why)
