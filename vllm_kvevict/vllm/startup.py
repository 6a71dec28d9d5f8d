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

SUPPORTED = (
    "vllm-kvevict supports: vLLM-CPU with its CPU_ATTN backend (vLLM 0.32), Model Runner V1, "
    "one KV-cache group of full causal attention (no sliding window, hybrid or encoder-decoder "
    "models), an unquantized KV cache, no tensor/pipeline/decode-context/data parallelism, no "
    "speculative decoding, and no other KV connector"
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


def configure_eviction(vllm_config: Any) -> bool:
    """Refuse an unsupported setup, else set our connector on ``vllm_config``; True if set."""
    if not wants_eviction(vllm_config.additional_config):
        return False
    reasons = unsupported_reasons(vllm_config)
    if reasons:
        raise UnsupportedEvictionSetup(reasons)
    from vllm.config import KVTransferConfig

    from vllm_kvevict.vllm.connector import CONNECTOR_MODULE, CONNECTOR_NAME

    ktc = vllm_config.kv_transfer_config
    if ktc is None or ktc.kv_connector is None:
        vllm_config.kv_transfer_config = KVTransferConfig(
            kv_connector=CONNECTOR_NAME, kv_role="kv_both", kv_connector_module_path=CONNECTOR_MODULE
        )
    return True


def unsupported_reasons(vllm_config: Any) -> list[str]:
    """Why eviction cannot run with ``vllm_config`` (empty when it can)."""
    from vllm import envs
    from vllm.platforms import current_platform

    reasons = []
    if not current_platform.is_cpu():
        reasons.append(f"the {current_platform.device_name or current_platform.device_type} platform "
                       "(eviction inside vLLM's CUDA attention backends is not implemented yet)")
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
