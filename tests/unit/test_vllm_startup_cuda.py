"""On CUDA, eviction starts with the FLASH_ATTN or TRITON_ATTN backend (FLASH_ATTN when none is
asked for) and refuses any other backend, full CUDA graphs for mixed batches and block sizes the
decode kernel cannot tile, naming what is supported. The platform is given to the functions (no
CUDA here); the configs are small namespaces carrying only what startup reads."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from vllm.config import CUDAGraphMode
from vllm.v1.attention.backends.registry import AttentionBackendEnum

from vllm_kvevict.vllm.startup import UnsupportedEvictionSetup, configure_eviction, unsupported_reasons

CUDA = SimpleNamespace(is_cuda=lambda: True, is_cpu=lambda: False, device_name="cuda", device_type="cuda")
ROCM = SimpleNamespace(is_cuda=lambda: False, is_cpu=lambda: False, device_name="rocm", device_type="cuda")


def _config(backend=None, mode=CUDAGraphMode.FULL_AND_PIECEWISE, block_size=16, per_kind=None, eviction=True):
    parallel = SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1, decode_context_parallel_size=1,
                               data_parallel_size=1, prefill_context_parallel_size=1)
    model = SimpleNamespace(get_sliding_window=lambda: None, is_hybrid=False, is_encoder_decoder=False,
                            attention_chunk_size=None)
    return SimpleNamespace(
        additional_config={"kv_eviction": {"scorer": "snapkv"}} if eviction else {}, kv_transfer_config=None,
        parallel_config=parallel, speculative_config=None, model_config=model,
        cache_config=SimpleNamespace(cache_dtype="auto", block_size=block_size),
        attention_config=SimpleNamespace(backend=backend, backend_per_kind=per_kind or {}),
        compilation_config=SimpleNamespace(cudagraph_mode=mode))


def test_no_backend_asked_for_gets_flash_attn_and_our_connector():
    config = _config()
    assert configure_eviction(config, CUDA)
    assert config.attention_config.backend == AttentionBackendEnum.FLASH_ATTN
    assert config.kv_transfer_config.kv_connector == "KVEvictConnector"
    plain = _config(eviction=False)
    assert not configure_eviction(plain, CUDA) and plain.attention_config.backend is None


@pytest.mark.parametrize("backend", [AttentionBackendEnum.FLASH_ATTN, AttentionBackendEnum.TRITON_ATTN])
@pytest.mark.parametrize("mode", [CUDAGraphMode.FULL_AND_PIECEWISE, CUDAGraphMode.PIECEWISE, CUDAGraphMode.NONE])
def test_flash_attn_and_triton_run_with_piecewise_graphs_or_eager(backend, mode):
    config = _config(backend=backend, mode=mode)
    assert unsupported_reasons(config, CUDA) == [] and configure_eviction(config, CUDA)
    assert config.attention_config.backend == backend


@pytest.mark.parametrize("change,named", [
    ({"backend": AttentionBackendEnum.FLASHINFER}, "the FLASHINFER attention backend"),
    ({"per_kind": {"full_attention": AttentionBackendEnum.FLEX_ATTENTION}}, "per-kind attention backends"),
    ({"mode": CUDAGraphMode.FULL}, "cudagraph_mode FULL"),
    ({"block_size": 48}, "block size 48"),
])
def test_what_cuda_eviction_cannot_run_with_is_refused_naming_the_supported_backends(change, named):
    with pytest.raises(UnsupportedEvictionSetup) as err:
        configure_eviction(_config(**change), CUDA)
    assert named in str(err.value) and "FLASH_ATTN or TRITON_ATTN" in str(err.value)


def test_other_platforms_are_refused():
    with pytest.raises(UnsupportedEvictionSetup, match="the rocm platform"):
        configure_eviction(_config(), ROCM)
