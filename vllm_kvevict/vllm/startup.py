"""At engine start: configure our KV connector when eviction is asked for, or refuse to start.

Called from vLLM's config post-init (:func:`vllm_kvevict.vllm.compat.v0_32.patch_auto_connector`)
in every process that builds a ``VllmConfig``. What eviction cannot run with is refused here
with one message naming what is supported, instead of failing every request at run time.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm_kvevict.config import ADDITIONAL_CONFIG_KEY

logger = logging.getLogger(__name__)

#: The CUDA attention backends eviction runs in (backends/flash_attn.py, backends/triton_attn.py).
CUDA_BACKENDS = ("FLASH_ATTN", "TRITON_ATTN")

SUPPORTED = (
    "vllm-kvevict supports: vLLM-CPU with its CPU_ATTN backend, or CUDA with the FLASH_ATTN or "
    "TRITON_ATTN attention backend (FLASH_ATTN unless --attention-backend says otherwise; "
    "piecewise CUDA graphs or eager), Model Runner V1, one KV-cache group of full causal attention "
    "(no sliding window, hybrid or encoder-decoder models), an unquantized KV cache, no "
    "tensor/pipeline/decode-context/data parallelism, no speculative decoding, and no other KV "
    "connector"
)


class UnsupportedEvictionSetup(ValueError):
    """KV eviction was asked for on a setup it does not support."""

    def __init__(self, reasons: list[str]):
        self.reasons = reasons
        super().__init__(f"KV eviction cannot run here: {'; '.join(reasons)}. {SUPPORTED}.")


def wants_eviction(additional_config: Any) -> bool:
    """Whether ``additional_config`` configures eviction (nested or flat ``kv_eviction``)."""
    try:
        return bool(additional_config) and ADDITIONAL_CONFIG_KEY in additional_config
    except TypeError:
        return False


def configure_eviction(vllm_config: Any, platform: Any = None) -> bool:
    """Refuse an unsupported setup, else set our connector on ``vllm_config`` (and, on CUDA with
    no attention backend asked for, ``FLASH_ATTN``); True if set. ``platform``: vLLM's
    ``current_platform`` unless given."""
    if not wants_eviction(vllm_config.additional_config):
        return False
    platform = _platform(platform)
    reasons = unsupported_reasons(vllm_config, platform)
    if reasons:
        raise UnsupportedEvictionSetup(reasons)
    from vllm.config import KVTransferConfig

    if platform.is_cuda() and vllm_config.attention_config.backend is None:
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        vllm_config.attention_config.backend = AttentionBackendEnum.FLASH_ATTN
        logger.info("kvevict: attention backend FLASH_ATTN (eviction runs in %s; --attention-backend "
                    "TRITON_ATTN picks the other)", " or ".join(CUDA_BACKENDS))

    from vllm_kvevict.vllm.connector import CONNECTOR_MODULE, CONNECTOR_NAME

    ktc = vllm_config.kv_transfer_config
    if ktc is None or ktc.kv_connector is None:
        vllm_config.kv_transfer_config = KVTransferConfig(
            kv_connector=CONNECTOR_NAME, kv_role="kv_both", kv_connector_module_path=CONNECTOR_MODULE
        )
    return True


def _platform(platform: Any) -> Any:
    if platform is None:
        from vllm.platforms import current_platform

        platform = current_platform
    return platform


def unsupported_reasons(vllm_config: Any, platform: Any = None) -> list[str]:
    """Why eviction cannot run with ``vllm_config`` (empty when it can); ``platform``: vLLM's
    ``current_platform`` unless given."""
    from vllm import envs

    platform = _platform(platform)
    reasons = []
    if platform.is_cuda():
        reasons += cuda_reasons(vllm_config)
    elif not platform.is_cpu():
        reasons.append(f"the {platform.device_name or platform.device_type} platform")
    parallel = vllm_config.parallel_config
    for name in ("tensor_parallel_size", "pipeline_parallel_size", "decode_context_parallel_size",
                 "data_parallel_size", "prefill_context_parallel_size"):
        size = getattr(parallel, name, 1) or 1
        if size > 1:
            reasons.append(f"{name}={size}")
    if vllm_config.speculative_config is not None:
        reasons.append("speculative decoding")
    if envs.VLLM_USE_V2_MODEL_RUNNER:
        reasons.append("VLLM_USE_V2_MODEL_RUNNER=1 (eviction runs on Model Runner V1)")
    cache = vllm_config.cache_config
    if cache is not None and str(getattr(cache, "cache_dtype", "auto")) not in ("auto", "float32", "bfloat16", "float16"):
        reasons.append(f"KV cache dtype {cache.cache_dtype}")
    reasons += policy_reasons(vllm_config)
    ktc = vllm_config.kv_transfer_config
    if ktc is not None and ktc.kv_connector not in (None, "KVEvictConnector"):
        reasons.append(f"the KV connector {ktc.kv_connector}")
    model = vllm_config.model_config
    if model is not None:
        if model.get_sliding_window() is not None:
            reasons.append(f"sliding-window attention ({model.get_sliding_window()} tokens)")
        if getattr(model, "is_hybrid", False):
            reasons.append("a hybrid model (several KV-cache groups)")
        if getattr(model, "is_encoder_decoder", False):
            reasons.append("an encoder-decoder model")
        if getattr(model, "attention_chunk_size", None):
            reasons.append("chunked local attention")
    return reasons


def policy_reasons(vllm_config: Any) -> list[str]:
    """The server's policy against what only the KV cache's block size decides
    (:meth:`~vllm_kvevict.config.EvictionConfig.check_block_size`); a bad policy itself is the
    flags' usage error, not a reason here."""
    from vllm_kvevict.config import EvictionConfigError
    from vllm_kvevict.vllm.api import server_default

    block_size = getattr(getattr(vllm_config, "cache_config", None), "block_size", None)
    if not block_size:
        return []
    try:
        server_default(vllm_config.additional_config).check_block_size(block_size)
    except EvictionConfigError as exc:
        return [f"the server's policy at block size {block_size}: {exc}"]
    except Exception:
        return []
    return []


def _name(value: Any) -> str:
    return str(getattr(value, "name", value))


def cuda_reasons(vllm_config: Any) -> list[str]:
    """What eviction cannot run with on CUDA: another attention backend (eviction lives in our
    FLASH_ATTN and TRITON_ATTN backends), a block size that is not a power of two, or full CUDA
    graphs for mixed batches (attention must run outside the graphs: vLLM turns
    ``FULL_AND_PIECEWISE`` into ``PIECEWISE`` itself)."""
    reasons = []
    attention = vllm_config.attention_config
    if attention.backend is not None and _name(attention.backend) not in CUDA_BACKENDS:
        reasons.append(f"the {_name(attention.backend)} attention backend")
    per_kind = {kind: _name(b) for kind, b in (getattr(attention, "backend_per_kind", None) or {}).items()
                if _name(b) not in CUDA_BACKENDS}
    if per_kind:
        reasons.append(f"per-kind attention backends {per_kind}")
    block_size = getattr(vllm_config.cache_config, "block_size", None)
    if block_size and block_size & (block_size - 1):
        reasons.append(f"block size {block_size} (the two-segment decode kernel needs a power of two)")
    mode = getattr(vllm_config.compilation_config, "cudagraph_mode", None)
    if mode is not None and _name(mode) == "FULL":
        reasons.append("cudagraph_mode FULL (eviction runs attention outside CUDA graphs: use PIECEWISE, or "
                       "FULL_AND_PIECEWISE, the default, which then runs piecewise)")
    return reasons
