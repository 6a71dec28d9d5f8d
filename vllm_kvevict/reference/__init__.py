"""The reference engine: an HF transformers model whose KV cache is evicted per (layer, KV head).

The oracle for tests and quality studies (see :mod:`.engine`). Names are imported lazily so
that ``vllm_kvevict.reference.tiny`` stays cheap to import.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ReferenceEngine": "engine",
    "Generation": "engine",
    "Prefilled": "prefilled",
    "HeadCache": "head_cache",
    "HeadStore": "head_cache",
    "DEFAULT_BLOCK_SIZE": "selection",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
