"""Patches of vLLM 0.32 internals for page eviction. One function per patched thing.

Every patch goes through :func:`vllm_kvevict.vllm.patching.wrap_attribute` (wraps once, raises
``AttributeError`` if vLLM moved the target). ``PATCH_TARGETS`` lists them for the tests.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

from vllm_kvevict.config import ADDITIONAL_CONFIG_KEY
from vllm_kvevict.vllm.patching import wrap_attribute

logger = logging.getLogger(__name__)

#: (module, qualified owner, attribute) of every vLLM 0.32 internal patched here.
PATCH_TARGETS: tuple[tuple[str, str, str], ...] = (
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_build_attention_metadata"),
    ("vllm.v1.core.kv_cache_coordinator", "KVCacheCoordinator", "cache_blocks"),
    ("vllm.v1.core.kv_cache_manager", "KVCacheManager", "get_computed_blocks"),
    ("vllm.config.vllm", "VllmConfig", "_post_init_kv_transfer_config"),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner", "add_requests"),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner", "prepare_attn"),
)


def wants_eviction(additional_config: Any) -> bool:
    """Whether ``additional_config`` configures eviction (nested or flat ``kv_eviction``)."""
    try:
        return bool(additional_config) and ADDITIONAL_CONFIG_KEY in additional_config
    except TypeError:
        return False


# ----------------------------------------------------------------------------- worker side
def patch_v1_runner_step_plan() -> None:
    """vLLM 0.32 ``GPUModelRunner._build_attention_metadata`` (also the CPU runner's): before the
    stock build, tell the worker state which batch row is which request, so the backend knows
    the rows to score and to compact. Replaces nothing; the stock method runs unchanged after.
    """
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_kvevict.vllm.worker import get_worker_state

    def make(original):
        def _build_attention_metadata(self, num_tokens, num_reqs, *args, **kwargs):
            state = get_worker_state()
            if state.enabled and state.step_open and not kwargs.get("for_cudagraph_capture", False):
                try:
                    plan_v1_rows(self, num_reqs)
                except Exception as exc:  # never into the engine core
                    logger.warning("kvevict: step plan failed, no eviction this step: %s", exc)
                    state.rows, state.compact_rows = {}, {}
            return original(self, num_tokens, num_reqs, *args, **kwargs)

        return _build_attention_metadata

    wrap_attribute(GPUModelRunner, "_build_attention_metadata", make)


def plan_v1_rows(runner: Any, num_reqs: int) -> None:
    """Plan every row of the V1 runner's persistent batch (``input_batch``) for this step."""
    from vllm_kvevict.vllm.worker import get_worker_state

    state = get_worker_state()
    _init_runner(state, runner, runner.cache_config.block_size)
    if state.num_layers == 0:
        return
    qsl = runner.query_start_loc.cpu[: num_reqs + 1]
    q_lens = (qsl[1:] - qsl[:-1]).tolist()
    computed = runner.input_batch.num_computed_tokens_cpu[:num_reqs]
    for row, req_id in enumerate(runner.input_batch.req_ids[:num_reqs]):
        req = runner.requests.get(req_id)
        if req is None:
            continue
        extra = getattr(req.sampling_params, "extra_args", None) if req.sampling_params else None
        state.plan_row(row, req_id, extra, req.num_prompt_tokens, int(computed[row]), int(q_lens[row]))


def _init_runner(state, runner, block_size: int) -> None:
    """First step of a runner (tests may run several per process): model, layers, block size."""
    if state.runner_ref is not None and state.runner_ref() is runner:
        return
    state.runner_ref = weakref.ref(runner)
    state.model = runner.get_model()
    state.o_proj = {}
    groups = runner.kv_cache_config.kv_cache_groups
    state.num_layers = len(groups[0].layer_names) if len(groups) == 1 else 0
    if len(groups) != 1 or (state.block_size is not None and state.block_size != block_size):
        logger.warning("kvevict: hybrid KV cache or kernel block size != block size: eviction off")
        state.num_layers = 0
    state.block_size = block_size
    # Eviction needs our connector in THIS engine (tests run several engines per process).
    state.enabled = our_connector_active()


def our_connector_active() -> bool:
    """Whether this worker's KV connector is ours."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    from vllm_kvevict.vllm.connector import KVEvictConnector

    return has_kv_transfer_group() and isinstance(get_kv_transfer_group(), KVEvictConnector)


# ----------------------------------------------------------------------------- MRV2 (GPU)
def patch_mrv2_runner() -> None:
    """vLLM 0.32 Model Runner V2 (``vllm/v1/worker/gpu/model_runner.py``, the GPU default).

    * ``add_requests``: remember each new request's ``SamplingParams.extra_args`` (MRV2 keeps
      no sampling params per request in its state);
    * ``prepare_attn(input_batch)``: after the stock gather of this step's block tables and slot
      mappings (slot mappings stay positional), plan the rows and compact the block-table rows
      and ``seq_lens`` of requests that evicted pages, in MRV2's per-step buffers, so that any
      stock attention backend attends only over kept pages.

    Not verifiable without a GPU (see docs): the whole MRV2 step; scoring on GPU needs a GPU
    backend's impl hook (our scoring impl subclasses the CPU backend only).
    """
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as MRV2Runner

    from vllm_kvevict.vllm.worker import get_worker_state

    def make_add(original):
        def add_requests(self, scheduler_output):
            original(self, scheduler_output)
            state = get_worker_state()
            if state.enabled:
                for new in scheduler_output.scheduled_new_reqs:
                    sp = new.sampling_params
                    state.extra_args[new.req_id] = getattr(sp, "extra_args", None) if sp else None

        return add_requests

    def make_prepare(original):
        def prepare_attn(self, input_batch):
            block_tables, slot_mappings = original(self, input_batch)
            state = get_worker_state()
            if state.enabled:
                try:
                    plan_mrv2_step(self, input_batch, block_tables)
                except Exception as exc:  # never into the engine core
                    logger.warning("kvevict: MRV2 step plan failed, no eviction this step: %s", exc)
                    state.rows, state.compact_rows = {}, {}
            return block_tables, slot_mappings

        return prepare_attn

    wrap_attribute(MRV2Runner, "add_requests", make_add)
    wrap_attribute(MRV2Runner, "prepare_attn", make_prepare)


def plan_mrv2_step(runner: Any, input_batch: Any, block_tables: Any) -> None:
    """Plan MRV2 rows and compact evicted rows in place (``block_tables[0]``, ``seq_lens``)."""
    from vllm_kvevict.vllm.worker import compact_in_place, get_worker_state

    state = get_worker_state()
    _init_runner(state, runner, runner.cache_config.block_size)
    if not state.enabled:
        return
    state.open_step()
    if state.num_layers == 0:
        return
    num_reqs = input_batch.num_reqs
    qsl = input_batch.query_start_loc_np[: num_reqs + 1]
    prompt_lens = runner.req_states.prompt_len.np[input_batch.idx_mapping_np[:num_reqs]]
    for row, req_id in enumerate(input_batch.req_ids[:num_reqs]):
        state.plan_row(
            row,
            req_id,
            state.extra_args.get(req_id),
            int(prompt_lens[row]),
            int(input_batch.num_computed_tokens_np[row]),
            int(qsl[row + 1] - qsl[row]),
        )
    if state.compact_rows:
        compact_in_place(
            block_tables[0], input_batch.seq_lens, input_batch.seq_lens_cpu_upper_bound,
            state.compact_rows, state.block_size,
        )
        state.compacted_by_runner = True


# ----------------------------------------------------------------------------- scheduler side
def patch_prefix_cache_freeze() -> None:
    """vLLM 0.32 ``KVCacheCoordinator.cache_blocks``: skip requests that evicted pages, so no
    block filled after eviction (computed against an evicted context) enters the prefix cache.
    """
    from vllm.v1.core.kv_cache_coordinator import KVCacheCoordinator

    from vllm_kvevict.vllm.manager import state_of

    def make(original):
        def cache_blocks(self, request, num_computed_tokens):
            state = state_of(self)
            if state is not None and request.request_id in state.frozen:
                return None
            return original(self, request, num_computed_tokens)

        return cache_blocks

    wrap_attribute(KVCacheCoordinator, "cache_blocks", make)


def patch_prefix_hit_cap() -> None:
    """vLLM 0.32 ``KVCacheManager.get_computed_blocks``: an evicting request's prefix-cache hit
    stops before its observation window (see ``SchedulerEvictionState.prefix_hit_cap``)."""
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    from vllm_kvevict.vllm.manager import state_of

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


# ----------------------------------------------------------------------------- configuration
def patch_auto_connector() -> None:
    """vLLM 0.32 ``VllmConfig._post_init_kv_transfer_config`` (fills ``kv_transfer_config`` in
    ``__post_init__``): also configure our KV connector when ``additional_config`` asks for
    eviction. Another connector already configured wins (eviction is then off, with a warning).
    """
    from vllm.config.vllm import VllmConfig

    def make(original):
        def _post_init_kv_transfer_config(self):
            original(self)
            ensure_connector(self)

        return _post_init_kv_transfer_config

    wrap_attribute(VllmConfig, "_post_init_kv_transfer_config", make)


def ensure_connector(vllm_config: Any) -> bool:
    """Set our connector on ``vllm_config`` if eviction is configured; True if it is ours."""
    from vllm.config import KVTransferConfig

    from vllm_kvevict.vllm.connector import CONNECTOR_MODULE, CONNECTOR_NAME

    if not wants_eviction(vllm_config.additional_config):
        return False
    ktc = vllm_config.kv_transfer_config
    if ktc is None or ktc.kv_connector is None:
        vllm_config.kv_transfer_config = KVTransferConfig(
            kv_connector=CONNECTOR_NAME, kv_role="kv_both", kv_connector_module_path=CONNECTOR_MODULE
        )
        return True
    if ktc.kv_connector == CONNECTOR_NAME:
        return True
    logger.warning("kvevict: KV connector %s already configured; eviction is off", ktc.kv_connector)
    return False


def register_attention_backend() -> None:
    """Our backend on vLLM's ``CUSTOM`` slot, and in place of ``CPU_ATTN`` (the CPU platform
    always picks ``CPU_ATTN`` and ignores ``--attention-backend``)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from vllm_kvevict.vllm.backend import BACKEND_CLASS_PATH

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_CLASS_PATH)
    register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_CLASS_PATH)


def install_all() -> None:
    patch_auto_connector()
    patch_prefix_cache_freeze()
    patch_prefix_hit_cap()
    patch_v1_runner_step_plan()
    patch_mrv2_runner()
    register_attention_backend()
