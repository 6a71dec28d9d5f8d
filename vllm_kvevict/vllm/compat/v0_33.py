"""Hooks into vLLM 0.33 internals: the same targets and signatures as vLLM 0.32 (checked against
0.33's source by ``tests/unit/test_vllm_compat_sources.py``), so the same functions.

No runtime of 0.33 is available to this project: it is supported with a warning that it is
untested (:mod:`vllm_kvevict.vllm.version`).
"""

from __future__ import annotations

from vllm_kvevict.vllm.compat.v0_32 import (  # noqa: F401  (this version's hooks and readers)
    CALL_ORDER,
    CUDA_BACKEND_PATHS,
    EVICTION_FEATURE,
    GPU_BACKEND_METHODS,
    PATCH_TARGETS,
    READ_SOURCES,
    batch_rows,
    block_list,
    free_blocks,
    install_all,
    null_block,
    plan_from_runner,
    single_manager,
    take_new_blocks,
)
